"""SCALE-UP (Guo et al., "SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via Analyzing
Scaled Prediction Consistency", ICLR 2023).

Each input's pixel values are amplified by n = 1, ..., 11 and clipped to [0, 1] (the authors' code:
``torch.clamp(h * x, 0, 1)`` for h in 1..11); the scaled prediction consistency SPC is the share of the
11 predictions equal to the unscaled one. Triggered inputs keep their (target) prediction under
amplification, clean ones drift: high SPC is suspicious. SPC takes 12 values, and more than 1 % of
clean images may share the highest one, so the 1 % false-rejection point is held exactly the
Neyman-Pearson way: inputs above the threshold are rejected, inputs at it with the probability that
makes the clean rejections 1 % (seeded). Cost: 11 forward passes.

Reviewed against the authors' code (github.com/JunfengGo/SCALE-UP, ``torch_model_wrapper.py``, ``test.py``)
and BackdoorBox's ``core/defenses/SCALE_UP.py`` (same group): amplification in [0, 1] pixel space with
clipping, as here; BackdoorBox's scale set is {3, 5, 7, 9, 11} and its "data-limited" variant maps SPC
through the benign samples' global mean and standard deviation, a monotone map that leaves the ranking,
and so the threshold at a fixed clean rejection rate, unchanged (not applied here). Both evaluate only
the triggered inputs that reach the target undefended, and the clean ones classified correctly:
``base.detection`` does the same for every detector.
"""

from __future__ import annotations

import numpy as np

from benchmarks.defenses.base import FPR, REJECTED, Context, Defense, Outcome, logits, threshold_at_fpr
from zoo.data import to_tensor_batch

SCALES = tuple(range(1, 12))


class ScaleUp(Defense):
    name, kind = "SCALE-UP", "detect"

    def fit(self, ctx: Context) -> None:
        self.model, self.rng = ctx.model, np.random.default_rng(ctx.seed)
        clean = self.spc(to_tensor_batch(ctx.clean))[0]
        self.threshold = threshold_at_fpr(clean)
        above, at = float((clean > self.threshold).mean()), float((clean == self.threshold).mean())
        self.at_threshold = min(1.0, max(0.0, (FPR - above) / at)) if at else 0.0  # rejection rate at the tie

    def spc(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(SPC, the unscaled prediction) of float NCHW inputs in [0, 1]."""
        preds = np.stack([logits(self.model, np.clip(n * x, 0, 1)).argmax(1).numpy() for n in SCALES], 1)
        return (preds == preds[:, :1]).mean(1), preds[:, 0]

    def __call__(self, images: np.ndarray) -> Outcome:
        spc, labels = self.spc(to_tensor_batch(images))
        reject = (spc > self.threshold) | ((spc == self.threshold) & (self.rng.random(len(spc)) < self.at_threshold))
        return Outcome(np.where(reject, REJECTED, labels), spc)
