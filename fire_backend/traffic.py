"""What the server saw: bounded running statistics of the features at the repair layer, per predicted class.

FIRE without the trigger estimates the backdoor direction from unlabeled live traffic
(``calibration.traffic``). The model that reads the repaired features and computes the prediction (the
protected model's tail) records, for every request, each sample's features and predicted class into a
``TrafficStats``:

- per class: the number of samples seen, and the running mean of their features (float64);
- per class: a uniform reservoir sample of at most ``capacity`` feature vectors (float16), so a
  cluster structure (clean members vs triggered ones) can be found without keeping the traffic.

Memory is bounded whatever the traffic: classes x (capacity x D x 2 + D x 8) bytes, the capacity
chosen from a byte budget when the stats are created. ``save`` writes them atomically (safetensors);
the CLI reads them with ``load``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from fire_backend.files import atomic_write

DEFAULT_BUDGET = 64 << 20  # bytes of reservoir for all classes together
MAX_CAPACITY = 512  # samples per class at most


class TrafficStats:
    def __init__(self, num_classes: int, feature_size: int, budget: int = DEFAULT_BUDGET, seed: int = 0):
        self.num_classes, self.feature_size = num_classes, feature_size
        self.capacity = int(max(8, min(MAX_CAPACITY, budget // max(1, num_classes * feature_size * 2))))
        self.counts = np.zeros(num_classes, np.int64)
        self.means = np.zeros((num_classes, feature_size), np.float64)
        self.reservoir = np.zeros((num_classes, self.capacity, feature_size), np.float16)
        self.rng = np.random.default_rng(seed)

    def update(self, features: np.ndarray, predicted: np.ndarray) -> None:
        """Record a batch: features (N, ...) and the predicted classes (N,)."""
        flat = features.reshape(len(features), -1)
        for c in np.unique(predicted):
            rows = flat[predicted == c]
            c = int(c)
            seen, n = int(self.counts[c]), len(rows)
            self.means[c] += (rows.mean(axis=0, dtype=np.float64) - self.means[c]) * (n / (seen + n))
            # reservoir sampling (Algorithm R, one batch at a time): sample i replaces a random slot with
            # probability capacity / (i + 1), so the reservoir stays a uniform sample of all seen
            i = seen + np.arange(n)
            slots = np.where(i < self.capacity, i, (self.rng.random(n) * (i + 1)).astype(np.int64))
            keep = slots < self.capacity
            self.reservoir[c, slots[keep]] = rows[keep]
            self.counts[c] = seen + n

    def samples(self, c: int) -> np.ndarray:
        """The reservoir of class ``c`` (float32, at most ``capacity`` rows)."""
        return self.reservoir[c, : min(int(self.counts[c]), self.capacity)].astype(np.float32)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        tensors = {"counts": self.counts, "means": self.means, "reservoir": self.reservoir}
        header = {"capacity": str(self.capacity), "extra": json.dumps(meta or {})}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    @classmethod
    def load(cls, path: str | Path) -> tuple[TrafficStats, dict]:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            counts, means, reservoir = (f.get_tensor(k) for k in ("counts", "means", "reservoir"))
        stats = cls.__new__(cls)
        stats.num_classes, stats.feature_size = means.shape
        stats.capacity = int(header.get("capacity", reservoir.shape[1]))
        stats.counts, stats.means, stats.reservoir = counts, means, reservoir
        stats.rng = np.random.default_rng(0)
        return stats, json.loads(header.get("extra", "{}"))
