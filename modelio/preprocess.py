"""How images become a model's input tensor: declared by the user, never assumed.

``Preprocess`` turns uint8 RGB images (N, H, W, 3) into what the model takes: its spatial size, channel
order, layout (NCHW / NHWC), dtype (float32 or uint8) and, for float inputs, ``x = pixel / divisor``
followed by ``(x - mean) / std`` per channel. A model that normalises inside takes plain pixels: the
default (divisor 255, mean 0, std 1) sends float32 in [0, 1]. It is recorded in split.json, so
calibration, clients and the served input check all use the same one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fire_backend.errors import FireError


class PreprocessError(FireError, ValueError):
    """A preprocessing declaration that does not fit the model or the images."""


@dataclass(frozen=True)
class Preprocess:
    height: int
    width: int
    channels: str = "RGB"  # order the model expects: RGB, BGR, or L (one grey channel)
    layout: str = "NCHW"  # or NHWC
    dtype: str = "float32"  # or uint8 (the model takes raw pixels)
    divisor: float = 255.0  # x = pixel / divisor (1: raw 0..255 values as float)
    mean: tuple[float, ...] | None = None  # None: 0 per channel
    std: tuple[float, ...] | None = None  # None: 1 per channel

    def __post_init__(self) -> None:
        n = 1 if self.channels == "L" else 3
        object.__setattr__(self, "mean", tuple(float(v) for v in (self.mean or (0.0,) * n)))
        object.__setattr__(self, "std", tuple(float(v) for v in (self.std or (1.0,) * n)))
        if self.channels not in ("RGB", "BGR", "L"):
            raise PreprocessError(f"channels must be RGB, BGR or L, got {self.channels!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise PreprocessError(f"layout must be NCHW or NHWC, got {self.layout!r}")
        if self.dtype not in ("float32", "uint8"):
            raise PreprocessError(f"input dtype must be float32 or uint8, got {self.dtype!r}")
        n = self.n_channels
        if self.dtype == "float32" and (len(self.mean) != n or len(self.std) != n or not all(s > 0 for s in self.std)):
            raise PreprocessError(f"mean and std need {n} values (std > 0), got {self.mean} and {self.std}")

    @property
    def n_channels(self) -> int:
        return 1 if self.channels == "L" else 3

    @property
    def dims(self) -> tuple[int, int, int]:
        """The input's dims without the batch axis."""
        c, h, w = self.n_channels, self.height, self.width
        return (c, h, w) if self.layout == "NCHW" else (h, w, c)

    def as_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(**d)

    def apply(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) RGB images of this size -> the model's input batch."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise PreprocessError(f"expected uint8 RGB images (N, H, W, 3), got {images.dtype} {images.shape}")
        if images.shape[1:3] != (self.height, self.width):
            raise PreprocessError(
                f"images are {images.shape[1]}x{images.shape[2]}, the model takes {self.height}x{self.width}"
            )
        x = images
        if self.channels == "BGR":
            x = x[..., ::-1]
        elif self.channels == "L":  # ITU-R 601 luma, as PIL's convert("L")
            x = np.rint(x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None].astype(np.uint8)
        if self.dtype == "uint8":
            out = x
        else:
            mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
            out = (x.astype(np.float32) / np.float32(self.divisor) - mean) / std
        if self.layout == "NCHW":
            out = out.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(out, dtype=self.dtype)

    def input_range(self) -> tuple[float, float] | None:
        """The values a float input can take when it comes from real pixels (the served input check);
        None for uint8 inputs, whose dtype is the range. Computed in float32 like ``apply``, with a margin
        of a few float32 steps."""
        if self.dtype == "uint8":
            return None
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        ends = (np.array([[0.0], [255.0]], np.float32) / np.float32(self.divisor) - mean) / std
        lo, hi = float(ends.min()), float(ends.max())
        return lo - 1e-6 * (1 + abs(lo)), hi + 1e-6 * (1 + abs(hi))

    def check_fits(self, dims: tuple, dtype: str, where: str) -> None:
        """Raise unless this declaration matches the model input's dims (batch first) and dtype."""
        if dtype != self.dtype:
            raise PreprocessError(f"{where}: the model's input is {dtype}, the preprocessing gives {self.dtype}")
        model = tuple(dims[1:])
        fixed = [(m, d) for m, d in zip(model, self.dims, strict=False) if isinstance(m, int) and m > 0]
        if len(model) != 3 or any(m != d for m, d in fixed):
            raise PreprocessError(
                f"{where}: the model's input has dims {tuple(dims)} (batch first); the declared preprocessing "
                f"({self.layout}, {self.n_channels} channel(s), {self.height}x{self.width}) gives {self.dims}. "
                "Declare the input's size, layout and channels to match (--input-size, --layout, --channels)."
            )


def infer_preprocess(dims: tuple, dtype: str, **declared) -> Preprocess:
    """A declaration completed from the model's input where that is unambiguous: layout from where the
    3 (or 1) channels sit, size from static dims. Anything declared wins and is checked."""
    body = tuple(dims[1:])
    if len(body) != 3:
        raise PreprocessError(
            f"the model's input has dims {tuple(dims)}: FIRE protects image models (N, C, H, W or N, H, W, C)"
        )
    layout = declared.pop("layout", None) or ("NHWC" if body[-1] in (1, 3) and body[0] not in (1, 3) else "NCHW")
    c, h, w = body if layout == "NCHW" else (body[2], body[0], body[1])
    height, width = declared.pop("height", None), declared.pop("width", None)
    height = height or (h if isinstance(h, int) and h > 0 else None)
    width = width or (w if isinstance(w, int) and w > 0 else None)
    if not (height and width):
        raise PreprocessError(f"the model's input {tuple(dims)} has a dynamic size: declare it with --input-size HxW")
    channels = declared.pop("channels", None) or ("L" if c == 1 else "RGB")
    return Preprocess(height=height, width=width, channels=channels, layout=layout, dtype=dtype, **declared)
