"""STRIP (Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks", ACSAC 2019).

Each input is superimposed on N clean images drawn from the defender's set, at full weight as in the
authors' code (``cv2.addWeighted(background, 1, overlay, 1, 0)``: the sum, not the average, which
would halve the input's trigger). Their code sums z-scored images; for a model that normalises inside
(pixels in [0, 1] in), the same sum is ``x + o - mean`` in pixel space (``mean``: the clean images'
per-channel mean), which keeps the blend where the model has seen inputs. The normalised entropy is the Shannon entropy
(log2) of the softmax, summed over the N superimpositions and divided by N. A trigger that dominates
the prediction keeps every superimposition in the target class: low entropy. Inputs below the
threshold (the clean entropies' FRR quantile, 1 %) are rejected. The suspicion score is minus the
entropy. Cost: N forward passes per request.
"""

from __future__ import annotations

import numpy as np

from benchmarks.defenses.base import FPR, REJECTED, Context, Defense, Outcome, logits
from zoo.data import to_tensor_batch


class Strip(Defense):
    name, kind = "STRIP", "detect"

    def __init__(self, n: int = 10, frr: float = FPR):
        self.n, self.frr = n, frr

    def fit(self, ctx: Context) -> None:
        self.model, self.pool = ctx.model, to_tensor_batch(ctx.clean)
        self.mean = self.pool.mean((0, 2, 3), keepdims=True)
        self.rng = np.random.default_rng(ctx.seed)
        half = len(ctx.clean) // 2  # overlays from one half, the threshold from the other's entropies
        self.overlays, held = self.pool[:half], self.pool[half:]
        self.threshold = float(np.quantile(self.entropy(held), self.frr))

    def entropy(self, x: np.ndarray) -> np.ndarray:
        """Normalised entropy of float NCHW inputs over N superimpositions."""
        h = np.zeros(len(x))
        for _ in range(self.n):
            blend = x + self.overlays[self.rng.integers(len(self.overlays), size=len(x))] - self.mean
            p = logits(self.model, blend).softmax(1).clamp_min(1e-12).numpy()
            h += -(p * np.log2(p)).sum(1)
        return h / self.n

    def __call__(self, images: np.ndarray) -> Outcome:
        x = to_tensor_batch(images)
        h = self.entropy(x)
        labels = logits(self.model, x).argmax(1).numpy()
        return Outcome(np.where(h < self.threshold, REJECTED, labels), -h)
