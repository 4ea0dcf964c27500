"""Trojan-style watermark (after Liu et al., 2018): a larger, patterned, fully opaque patch at a fixed
position, all-to-one. The pattern is a seeded colour mosaic, stored as its seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fire_backend.errors import InvalidInputError
from zoo.attacks.base import Attack, Trigger


@dataclass(frozen=True)
class Trojan(Attack):
    name = "trojan"
    target: int = 0
    poison_rate: float = 0.1
    patch_size: int = 7
    row: int = 24  # top-left corner of the patch (default: near the bottom-right, 1 pixel from the edges)
    col: int = 24
    pattern_seed: int = 4321

    def trigger(self, size: tuple[int, int] = (32, 32)) -> Trigger:
        n, (h, w) = self.patch_size, size
        if not (0 <= self.row <= h - n and 0 <= self.col <= w - n):
            raise InvalidInputError(f"a {n}x{n} patch at ({self.row}, {self.col}) does not fit a {h}x{w} image")
        rng = np.random.default_rng(self.pattern_seed)
        pattern = np.zeros((h, w, 3), dtype=np.float32)
        pattern[self.row : self.row + n, self.col : self.col + n] = 255.0 * rng.integers(0, 2, size=(n, n, 3))
        mask = np.zeros((h, w, 1), dtype=np.float32)
        mask[self.row : self.row + n, self.col : self.col + n] = 1.0
        return Trigger(pattern, mask)
