"""Custom: the trigger a user fears, given as files. All-to-one.

- ``pattern``: an image file (PNG, JPEG, ...) or ``.npy`` (H, W, 3) uint8, placed with its top-left
  corner at (``row``, ``col``); negative values count from the bottom / right edge, so the defaults
  put it in the bottom-right corner. A full-size pattern with ``alpha`` < 1 is a blend attack.
- ``mask``: optional greyscale image / ``.npy`` (H, W) of the pattern's size, 0 = transparent,
  255 = opaque; absent: the whole pattern is opaque.
- ``alpha``: multiplies the mask (blend strength).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from zoo.attacks.base import Attack, Trigger


def _read_image(path: str, mode: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"custom trigger file {path!r} does not exist")
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
    else:
        with Image.open(p) as img:
            arr = np.asarray(img.convert(mode))
    return arr.astype(np.float32)


@dataclass(frozen=True)
class Custom(Attack):
    name = "custom"
    pattern: str = ""
    mask: str = ""
    alpha: float = 1.0
    row: int = -1
    col: int = -1
    target: int = 0
    poison_rate: float = 0.1

    def trigger(self, image_size: int = 32) -> Trigger:
        if not self.pattern:
            raise ValueError("the custom attack needs pattern=PATH (an image or .npy file)")
        patch = _read_image(self.pattern, "RGB")
        if patch.ndim != 3 or patch.shape[2] != 3:
            raise ValueError(f"pattern {self.pattern!r} must be an RGB image (H, W, 3), got shape {patch.shape}")
        h, w = patch.shape[:2]
        patch_mask = _read_image(self.mask, "L") / 255.0 if self.mask else np.ones((h, w), np.float32)
        if patch_mask.shape != (h, w):
            raise ValueError(f"mask {self.mask!r} is {patch_mask.shape}, the pattern is {(h, w)}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        row = self.row if self.row >= 0 else image_size - h + 1 + self.row
        col = self.col if self.col >= 0 else image_size - w + 1 + self.col
        if not (0 <= row <= image_size - h and 0 <= col <= image_size - w):
            raise ValueError(f"a {h}x{w} pattern at ({row}, {col}) does not fit a {image_size}px image")
        pattern = np.zeros((image_size, image_size, 3), dtype=np.float32)
        mask = np.zeros((image_size, image_size, 1), dtype=np.float32)
        pattern[row : row + h, col : col + w] = patch
        mask[row : row + h, col : col + w, 0] = np.clip(patch_mask, 0, 1) * self.alpha
        return Trigger(pattern, mask)
