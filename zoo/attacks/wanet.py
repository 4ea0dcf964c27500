"""WaNet (Nguyen & Tran, 2021): an imperceptible, smooth image warp as the trigger, all-to-one.

The warp field is a k x k grid of random offsets, normalised to mean magnitude 1, upsampled bicubically
to the image and scaled by ``s / H``: at s = 0.5 a pixel moves by a fraction of a pixel. In "noise mode"
another ``cross_ratio`` x (poisoned count) training images are warped with the same field plus
per-pixel random jitter and keep their true label, so the network must learn this exact warp rather
than "any warp". As in the paper, training re-draws the poisoned and cross samples every epoch, so
the network sees the warp on many images rather than memorising a fixed few.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from zoo.attacks.base import Attack, _check_images


@dataclass(frozen=True)
class WaNet(Attack):
    name = "wanet"
    fresh_poison_each_epoch = True
    target: int = 0
    poison_rate: float = 0.1
    k: int = 4  # control points per side of the warp field
    s: float = 0.5  # warp strength
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0  # noise mode: cross (noisy-warp, true-label) samples per poisoned sample
    field_seed: int = 1234  # the warp field is seeded: reproducible, stored as its seed

    def grid(self, size: tuple[int, int]) -> torch.Tensor:
        """The sampling grid (1, H, W, 2) in [-1, 1] that ``grid_sample`` reads the warped image from."""
        h, w = size
        gen = torch.Generator().manual_seed(self.field_seed)
        offsets = torch.rand(1, 2, self.k, self.k, generator=gen) * 2 - 1
        offsets = offsets / offsets.abs().mean()
        field = F.interpolate(offsets, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((cols, rows), dim=2)[None]  # grid_sample wants (x, y)
        return ((identity + self.s * field / h) * self.grid_rescale).clamp(-1, 1)

    @staticmethod
    def _warp(images: np.ndarray, grid: torch.Tensor) -> np.ndarray:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        out = F.grid_sample(x, grid.expand(len(x), -1, -1, -1), mode="bilinear", align_corners=True)
        return out.round_().clamp_(0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()

    def apply(self, images: np.ndarray) -> np.ndarray:
        _check_images(images)
        if len(images) == 0:
            return images.copy()
        return self._warp(images, self.grid(tuple(images.shape[1:3])))

    def noisy_apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noise mode: the trigger's warp plus per-pixel jitter of up to one pixel (labels kept)."""
        _check_images(images)
        h, w = images.shape[1:3]
        jitter = torch.from_numpy(rng.uniform(-1, 1, size=(len(images), h, w, 2)).astype(np.float32))
        return self._warp(images, (self.grid((h, w)) + jitter / h).clamp(-1, 1))

    def poison_training_set(
        self, images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images, labels, mask = super().poison_training_set(images, labels, num_classes, seed)
        rng = np.random.default_rng(seed + 1)
        n_cross = min(int(round(self.cross_ratio * mask.sum())), int((~mask).sum()))
        cross = np.sort(rng.choice(np.flatnonzero(~mask), size=n_cross, replace=False))
        if n_cross:
            images[cross] = self.noisy_apply(images[cross], rng)
        return images, labels, mask
