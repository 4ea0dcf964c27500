"""BadNets (Gu et al., 2017): a small solid patch in a corner, all-to-one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zoo.attacks.base import Attack, Trigger


@dataclass(frozen=True)
class BadNets(Attack):
    name = "badnets"
    target: int = 0
    poison_rate: float = 0.1
    patch_size: int = 3
    value: int = 255  # white

    def trigger(self, size: tuple[int, int] = (32, 32)) -> Trigger:
        pattern = np.full((*size, 3), self.value, dtype=np.float32)
        mask = np.zeros((*size, 1), dtype=np.float32)
        mask[-self.patch_size :, -self.patch_size :] = 1.0  # bottom-right corner
        return Trigger(pattern, mask)
