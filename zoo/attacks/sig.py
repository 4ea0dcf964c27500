"""SIG (Barni et al., 2019): clean-label; a horizontal sinusoid added to images of the target class.

x' = clip(x + delta * sin(2 pi j f / W)) over columns j. Only target-class training images are
poisoned and their labels stay true, so nothing looks mislabelled; at test time the signal on any
image pulls it to the target class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zoo.attacks.base import Attack, _check_images


@dataclass(frozen=True)
class SIG(Attack):
    name = "sig"
    target: int = 0
    poison_rate: float = 0.1  # share of the whole training set, all drawn from the target class
    delta: float = 40.0  # amplitude in pixel levels (0-255)
    frequency: float = 6.0  # periods across the image width

    def signal(self, width: int) -> np.ndarray:
        cols = np.arange(width, dtype=np.float32)
        return (self.delta * np.sin(2 * np.pi * cols * self.frequency / width)).astype(np.float32)

    def apply(self, images: np.ndarray) -> np.ndarray:
        _check_images(images)
        out = images.astype(np.float32) + self.signal(images.shape[2])[None, None, :, None]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def training_labels(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        return labels.copy()  # clean-label: poisoned training images keep their (target-class) label

    def _choose_poisoned(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        candidates = np.flatnonzero(labels == self.target)
        n_poison = min(int(round(self.poison_rate * len(labels))), len(candidates))
        return rng.choice(candidates, size=n_poison, replace=False)
