"""Blended (Chen et al., 2017): a fixed full-image pattern blended in, x' = (1 - a) x + a t."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zoo.attacks.base import Attack, Trigger


@dataclass(frozen=True)
class Blended(Attack):
    name = "blended"
    target: int = 0
    poison_rate: float = 0.1
    alpha: float = 0.2
    pattern_seed: int = 1234  # the pattern is seeded uniform noise: reproducible, stored as its seed

    def trigger(self, size: tuple[int, int] = (32, 32)) -> Trigger:
        rng = np.random.default_rng(self.pattern_seed)
        pattern = rng.integers(0, 256, size=(*size, 3)).astype(np.float32)
        mask = np.full((*size, 1), self.alpha, dtype=np.float32)
        return Trigger(pattern, mask)
