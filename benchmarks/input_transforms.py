"""Input-transform baselines: the cheap runtime purifications a user would try before FIRE.

Each takes uint8 NHWC images and returns the transformed uint8 images; the model then runs unchanged.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Transform = Callable[[np.ndarray], np.ndarray]


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


def _uint8(x: torch.Tensor) -> np.ndarray:
    return x.round().clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()


def shrink_pad(images: np.ndarray, pad: int = 4, seed: int = 0) -> np.ndarray:
    """ShrinkPad (Li et al., 2021): shrink by ``pad`` pixels, zero-pad back at a random offset."""
    n, h, w, _ = images.shape
    small = F.interpolate(_nchw(images), size=(h - pad, w - pad), mode="bilinear", align_corners=False)
    out = torch.zeros(n, 3, h, w)
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(0, pad + 1, size=n), rng.integers(0, pad + 1, size=n)
    for i in range(n):
        out[i, :, rows[i] : rows[i] + h - pad, cols[i] : cols[i] + w - pad] = small[i]
    return _uint8(out)


def jpeg(images: np.ndarray, quality: int = 50) -> np.ndarray:
    """JPEG re-compression at ``quality``."""
    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return out


def median_blur(images: np.ndarray, size: int = 3) -> np.ndarray:
    """Median filter over ``size`` x ``size`` windows (reflect-padded), per channel."""
    x = F.pad(_nchw(images), [size // 2] * 4, mode="reflect")
    n, c, h, w = images.shape[0], 3, images.shape[1], images.shape[2]
    patches = F.unfold(x, size).view(n, c, size * size, h * w)
    return _uint8(patches.median(dim=2).values.view(n, c, h, w))


def gaussian_blur(images: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Gaussian blur with a (2 * ceil(2 sigma) + 1)-tap kernel, reflect-padded."""
    radius = int(np.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k1 = torch.exp(-(t**2) / (2 * sigma**2))
    k1 /= k1.sum()
    kernel = (k1[:, None] * k1[None, :]).expand(3, 1, -1, -1)
    x = F.pad(_nchw(images), [radius] * 4, mode="reflect")
    return _uint8(F.conv2d(x, kernel, groups=3))


BASELINES: dict[str, Transform] = {
    "ShrinkPad-4": shrink_pad,
    "JPEG-50": jpeg,
    "median-3x3": median_blur,
    "Gaussian-1.0": gaussian_blur,
}
