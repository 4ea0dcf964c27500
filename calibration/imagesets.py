"""A user's calibration images from disk: a folder in ImageFolder layout (``class/xxx.png``, labels from
the sorted class folder names, or numeric folder names taken as the label), a flat folder (no labels),
single files, or ``.npz`` archives with a uint8 ``images`` array (and optionally ``labels``).

Images must already have the model's input size and be colour (RGB) or grey images for a one-channel
model: a wrong size or channel count is refused with the file's name, unless ``resize=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fire_backend.errors import FireError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".webp")


class ImageSetError(FireError, ValueError):
    """Images that cannot be used as given; the message names the file and what to do."""


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray | None  # int64 (N,), None for unlabeled images
    classes: list[str] | None = None  # ImageFolder class names, in label order

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, n: int, seed: int = 0) -> ImageSet:
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[: min(n, len(self))])
        return ImageSet(self.images[idx], None if self.labels is None else self.labels[idx], self.classes)


def _read(path: Path, size: tuple[int, int], resize: bool) -> np.ndarray:
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode not in ("RGB", "L", "RGBA", "P", "I;16", "CMYK", "YCbCr"):
                raise ImageSetError(f"{path}: unsupported image mode {mode}")
            if mode == "RGBA" and np.asarray(img)[..., 3].min() < 255:
                raise ImageSetError(f"{path}: has transparency; flatten it onto a background first")
            rgb = img.convert("RGB")
            if rgb.size != (size[1], size[0]):
                if not resize:
                    raise ImageSetError(
                        f"{path}: {rgb.size[0]}x{rgb.size[1]} pixels, the model takes {size[1]}x{size[0]}; "
                        "resize the images first or pass --resize"
                    )
                rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, SyntaxError) as e:
        raise ImageSetError(f"{path}: not a readable image ({e})") from None


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _stack(files: list[Path], size: tuple[int, int], resize: bool) -> np.ndarray:
    return np.stack([_read(f, size, resize) for f in files]) if files else np.zeros((0, *size, 3), np.uint8)


def read_image_set(paths: list[str | Path], size: tuple[int, int], resize: bool = False) -> ImageSet:
    """Images (and labels where the layout gives them) from folders, files or .npz archives."""
    arrays: list[np.ndarray] = []
    labels: list[np.ndarray | None] = []
    classes = None
    for p in map(Path, paths):
        if not p.exists():
            raise ImageSetError(f"{p}: no such file or folder")
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if "images" not in z:
                    raise ImageSetError(f"{p}: no 'images' array")
                arr, lab = z["images"], (z["labels"].astype(np.int64) if "labels" in z else None)
            if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[1:3] != tuple(size):
                want = f"uint8 (N, {size[0]}, {size[1]}, 3)"
                raise ImageSetError(f"{p}: 'images' must be {want}, got {arr.dtype} {arr.shape}")
            arrays.append(arr)
            labels.append(lab)
        elif p.is_dir() and any(d.is_dir() for d in p.iterdir()):  # ImageFolder: one folder per class
            subdirs = sorted(d for d in p.iterdir() if d.is_dir())
            classes = [d.name for d in subdirs]
            numeric = all(n.isdigit() for n in classes)
            for k, d in enumerate(subdirs):
                found = _files(d)
                arrays.append(_stack(found, size, resize))
                labels.append(np.full(len(found), int(d.name) if numeric else k, dtype=np.int64))
        else:
            found = _files(p) if p.is_dir() else [p]
            arrays.append(_stack(found, size, resize))
            labels.append(None)
    if not sum(len(a) for a in arrays):
        raise ImageSetError(f"no images in {[str(p) for p in paths]} (looked for {', '.join(IMAGE_SUFFIXES)})")
    y = np.concatenate(labels) if all(lab is not None for lab in labels) else None
    return ImageSet(np.concatenate(arrays), y, classes)
