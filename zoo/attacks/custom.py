"""Custom: the trigger a user fears, given as files. All-to-one.

- ``pattern``: an image file (PNG, JPEG, ...) or ``.npy`` (H, W, 3) uint8, placed with its top-left
  corner at (``row``, ``col``); negative values count from the bottom / right edge, so the defaults
  put it in the bottom-right corner. A full-size pattern with ``alpha`` < 1 is a blend attack.
- ``mask``: optional greyscale image / ``.npy`` (H, W) of the pattern's size, 0 = transparent,
  255 = opaque; absent: the whole pattern is opaque.
- ``alpha``: multiplies the mask (blend strength).

The spec stores the trigger itself, not the file names (``pattern_png`` / ``mask_png``: the pixels as
base64 PNG), so model.json and direction files keep working when the files move or are deleted.
"""

from __future__ import annotations

import base64
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fire_backend.errors import InvalidInputError, MissingFileError
from zoo.attacks.base import Attack, Trigger


def _read_image(path: str, mode: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"custom trigger file {path!r} does not exist")
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
    else:
        with Image.open(p) as img:
            arr = np.asarray(img.convert(mode))
    return arr.astype(np.float32)


def _png(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _unpng(data: str, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data))) as img:
        return np.asarray(img.convert(mode)).astype(np.float32)


TRIGGER_FILE_FIELDS = ("pattern", "mask")  # parameters that name files


def resolve_trigger_files(spec: dict, base: str | Path) -> dict:
    """A spec whose trigger files are taken relative to ``base`` (the folder of the file that names
    them: an attack config, a model.json), not to the current directory."""
    out = dict(spec)
    for key in TRIGGER_FILE_FIELDS:
        if out.get(key) and not Path(out[key]).is_absolute():
            out[key] = str((Path(base) / out[key]).resolve())
    return out


@dataclass(frozen=True)
class Custom(Attack):
    name = "custom"
    pattern: str = ""  # a file
    mask: str = ""
    pattern_png: str = ""  # or the pixels themselves (base64 PNG): what spec() records
    mask_png: str = ""
    alpha: float = 1.0
    row: int = -1
    col: int = -1
    target: int = 0
    poison_rate: float = 0.1

    def _pixels(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The pattern (H, W, 3) and mask (H, W) or None, from the stored pixels or the files."""
        if self.pattern_png:
            patch = _unpng(self.pattern_png, "RGB")
        elif self.pattern:
            patch = _read_image(self.pattern, "RGB")
        else:
            raise InvalidInputError("the custom attack needs pattern=PATH (an image or .npy file)")
        if patch.ndim != 3 or patch.shape[2] != 3:
            raise InvalidInputError(f"pattern {self.pattern!r} must be an RGB image (H, W, 3), got shape {patch.shape}")
        if self.mask_png:
            return patch, _unpng(self.mask_png, "L")
        return patch, _read_image(self.mask, "L") if self.mask else None

    def spec(self) -> dict:
        """The trigger's pixels, not its file names: the spec outlives the files."""
        patch, mask = self._pixels()
        d = {**asdict(self), "pattern": "", "mask": "", "pattern_png": _png(patch), "mask_png": ""}
        if mask is not None:
            d["mask_png"] = _png(mask)
        return {"name": self.name, **d}

    def trigger(self, size: tuple[int, int] = (32, 32)) -> Trigger:
        patch, mask = self._pixels()
        h, w = patch.shape[:2]
        patch_mask = mask / 255.0 if mask is not None else np.ones((h, w), np.float32)
        if patch_mask.shape != (h, w):
            raise InvalidInputError(f"mask {self.mask!r} is {patch_mask.shape}, the pattern is {(h, w)}")
        if not 0 < self.alpha <= 1:
            raise InvalidInputError(f"alpha must be in (0, 1], got {self.alpha}")
        height, width = size
        row = self.row if self.row >= 0 else height - h + 1 + self.row
        col = self.col if self.col >= 0 else width - w + 1 + self.col
        if not (0 <= row <= height - h and 0 <= col <= width - w):
            raise InvalidInputError(f"a {h}x{w} pattern at ({row}, {col}) does not fit a {height}x{width} image")
        pattern = np.zeros((height, width, 3), dtype=np.float32)
        mask = np.zeros((height, width, 1), dtype=np.float32)
        pattern[row : row + h, col : col + w] = patch
        mask[row : row + h, col : col + w, 0] = np.clip(patch_mask, 0, 1) * self.alpha
        return Trigger(pattern, mask)
