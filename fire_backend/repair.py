"""FIRE's repair: one formula, two forms. No Triton here.

Every repair mode is the same edit of the flattened features ``x`` (N, D):

    s(x) = x V^T - m                        scores along k unit directions V (k, D), m = V mu
    C(s) = [s_1 > tau] * (s * w + c)        coefficients (N, k): a gate on the first score
    x'   = x - C(s(x)) V

with, from the direction file (b = beta / |beta|, mu the clean mean):

    mode       V                            w       c                tau
    project    b, or the rank-k basis       alpha   0                0          (remove the trigger component)
    gated      b                            0       alpha |beta|     threshold  (subtract where s > tau)
    subtract   b                            0       alpha |beta|     -inf       (subtract everywhere)

``scores``, ``gate`` and ``coefficients`` are written once, with array operators only, so they compute
the same on torch tensors and NumPy arrays. Both forms FIRE needs are derived from them:

- ``Repair``: the serving form. Validates the features and edits them in place (``addmm_``: no copy, so
  the Triton model's DLPack round trip stays zero-copy).
- ``RepairGraph``: an ``nn.Module`` computing ``x - C V`` out of place, traceable to ONNX (the fused model).

The tests hold the two equal for every mode, alpha and rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fire_backend.directions import MODES, DirectionFile


class RepairInputError(ValueError):
    """The activation tensor cannot be repaired (shape, dtype, device or non-finite values)."""


@dataclass(frozen=True)
class RepairParams:
    """The parameters of the formula above, for one direction file, mode and alpha (float32)."""

    mode: str
    directions: torch.Tensor  # V (k, D), orthonormal rows, the first b
    offsets: torch.Tensor  # m = V mu (k,)
    weights: torch.Tensor  # w (k,)
    shifts: torch.Tensor  # c (k,)
    threshold: torch.Tensor  # tau (1,)
    feature_shape: tuple[int, ...]
    beta_norm: float

    @classmethod
    def from_directions(
        cls, d: DirectionFile, mode: str | None = None, device: str | torch.device = "cpu"
    ) -> RepairParams:
        mode = mode or d.mode
        if mode not in MODES:
            raise ValueError(f"unknown repair mode {mode!r}; choose one of {MODES}")
        beta = d.beta.reshape(-1).double()
        norm = float(beta.norm())
        if mode == "project" and d.basis is not None:
            v = d.basis.reshape(len(d.basis), -1).double()
        else:
            v = (beta / norm)[None]
        k = len(v)
        if mode == "project":
            w, c, tau = torch.full((k,), float(d.alpha)), torch.zeros(k), 0.0
        else:
            w, c = torch.zeros(1), torch.tensor([d.alpha * norm])
            tau = float(d.threshold) if mode == "gated" else -math.inf

        def f32(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=torch.float32).contiguous()

        return cls(
            mode=mode,
            directions=f32(v),
            offsets=f32(v @ d.mu.reshape(-1).double()),
            weights=f32(w),
            shifts=f32(c),
            threshold=f32(torch.tensor([tau])),
            feature_shape=tuple(d.feature_shape),
            beta_norm=norm,
        )


# The formula. ``p`` is anything with the parameter attributes (RepairParams, RepairGraph's buffers).
def scores(flat, p):
    """s = x V^T - m: (N, k), the first column is the projection score <x - mu, b>."""
    return flat @ p.directions.T - p.offsets


def gate(s, p):
    """(N, 1): which samples the repair moves."""
    return s[:, :1] > p.threshold


def coefficients(s, p):
    """C = [s_1 > tau] * (s * w + c): (N, k), how far to move each sample along each direction."""
    return gate(s, p) * (s * p.weights + p.shifts)


def repaired(flat, p):
    """x - C(s(x)) V, out of place (the exportable form)."""
    return flat - coefficients(scores(flat, p), p) @ p.directions


class Repair:
    """The serving form: ``repair(x, inplace=True)`` edits ``x``'s memory and returns a view of it."""

    def __init__(self, directions: DirectionFile, mode: str | None = None, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.params = RepairParams.from_directions(directions, mode, self.device)
        self.mode = self.params.mode
        self.feature_shape = self.params.feature_shape
        self.beta_norm = self.params.beta_norm

    @property
    def unit(self) -> torch.Tensor:
        """b = beta / |beta|, flattened."""
        return self.params.directions[0]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Projection score s(x) = <x - mu, b> per sample."""
        return scores(x.reshape(len(x), -1), self.params)[:, 0]

    def check(self, x: torch.Tensor) -> None:
        if x.dtype != torch.float32:
            raise RepairInputError(f"features must be float32, got {x.dtype}")
        if tuple(x.shape[1:]) != self.feature_shape or x.ndim != len(self.feature_shape) + 1:
            raise RepairInputError(
                f"features must have shape (N, {', '.join(map(str, self.feature_shape))}), got {tuple(x.shape)}"
            )
        if x.device != self.device:
            raise RepairInputError(f"features are on {x.device}, the repair runs on {self.device}")
        # One reduction instead of an elementwise isfinite pass (~40x cheaper): any NaN or Inf makes the
        # sum non-finite. Accumulated in float64, so no sum of finite float32 values can overflow.
        if x.numel() and not math.isfinite(float(x.sum(dtype=torch.float64))):
            raise RepairInputError("features contain NaN or Inf (non-finite values in the input image?)")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return self.repair_with_scores(x, inplace)[0]

    @torch.no_grad()
    def repair_with_scores(self, x: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The repaired features and each sample's projection score (read before the edit)."""
        self.check(x)
        if len(x) == 0:
            return x, x.new_zeros(0)
        if not x.is_contiguous():
            if inplace:
                raise RepairInputError("in-place repair needs a contiguous tensor")
            x = x.contiguous()
        flat = x.view(len(x), -1)
        s = scores(flat, self.params)
        out = flat if inplace else flat.clone()
        out.addmm_(coefficients(s, self.params), self.params.directions, alpha=-1)
        return out.view(x.shape), s[:, 0]

    def changed(self, projection_scores: torch.Tensor) -> int:
        """How many samples with these projection scores the repair moves."""
        return int((projection_scores > self.params.threshold).sum())


class RepairGraph(nn.Module):
    """The exportable form: the same formula as ``Repair``, out of place, as traceable torch ops."""

    def __init__(self, directions: DirectionFile, mode: str | None = None):
        super().__init__()
        p = RepairParams.from_directions(directions, mode)
        self.mode, self.feature_shape = p.mode, p.feature_shape
        for name in ("directions", "offsets", "weights", "shifts", "threshold"):
            self.register_buffer(name, getattr(p, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A constant target shape keeps (C, H, W) static for the tail: with reshape(x.shape) onnxruntime
        # loses them and its layout optimizations, costing ~15 % of the fused model's time.
        return repaired(x.flatten(1), self).reshape(-1, *self.feature_shape)
