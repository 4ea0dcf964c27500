"""SCALE-UP (Guo et al., "SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via Analyzing
Scaled Prediction Consistency", ICLR 2023).

Each input's pixel values are amplified by n = 1, ..., 11 and clipped to [0, 1] (the authors' code:
``torch.clamp(h * x, 0, 1)`` for h in 1..11); the scaled prediction consistency SPC is the share of the
11 predictions equal to the unscaled one. Triggered inputs keep their (target) prediction under
amplification, clean ones drift: high SPC is suspicious. The threshold is the SPC that at most 1 % of
the defender's clean images exceed; inputs above it are rejected. Cost: 11 forward passes.
"""

from __future__ import annotations

import numpy as np

from benchmarks.defenses.base import REJECTED, Context, Defense, Outcome, logits, threshold_at_fpr
from zoo.data import to_tensor_batch

SCALES = tuple(range(1, 12))


class ScaleUp(Defense):
    name, kind = "SCALE-UP", "detect"

    def fit(self, ctx: Context) -> None:
        self.model = ctx.model
        self.threshold = threshold_at_fpr(self.spc(to_tensor_batch(ctx.clean))[0])

    def spc(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(SPC, the unscaled prediction) of float NCHW inputs in [0, 1]."""
        preds = np.stack([logits(self.model, np.clip(n * x, 0, 1)).argmax(1).numpy() for n in SCALES], 1)
        return (preds == preds[:, :1]).mean(1), preds[:, 0]

    def __call__(self, images: np.ndarray) -> Outcome:
        spc, labels = self.spc(to_tensor_batch(images))
        return Outcome(np.where(spc > self.threshold, REJECTED, labels), spc)
