"""The repair itself: plain torch, batched, on any device. No Triton here.

With beta the trigger direction, b = beta / |beta|, mu the clean feature mean, and the projection
score s(x) = <x - mu, b> (flattened per sample):

- ``subtract``: x <- x - alpha * beta                      (the paper's form; moves every input)
- ``project``:  x <- x - alpha * max(0, s(x)) * b          (removes only the trigger component present)
  rank k (a ``basis`` b_1 = b, b_2 .. b_k in the file): where s(x) > 0, also remove alpha * s_j(x) b_j
  for j >= 2, s_j(x) = <x - mu, b_j>: the trigger's spread across a low-rank subspace
- ``gated``:    x <- x - alpha * beta  where s(x) > tau    (tau: clean-score quantile at a chosen FPR)

``Repair.__call__(x, inplace=True)`` edits ``x``'s memory and returns a view of it: no copy, which is
what the Triton model relies on for a zero-copy DLPack round trip.
"""

from __future__ import annotations

import math

import torch

from fire_backend.directions import MODES, DirectionFile


class RepairInputError(ValueError):
    """The activation tensor cannot be repaired (shape, dtype, device or non-finite values)."""


class Repair:
    def __init__(self, directions: DirectionFile, mode: str | None = None, device: str | torch.device = "cpu"):
        self.mode = mode or directions.mode
        if self.mode not in MODES:
            raise ValueError(f"unknown repair mode {self.mode!r}; choose one of {MODES}")
        self.device = torch.device(device)
        self.feature_shape = directions.feature_shape
        beta = directions.beta.to(self.device, torch.float32).reshape(-1)
        mu = directions.mu.to(self.device, torch.float32).reshape(-1)
        self.alpha = float(directions.alpha)
        self.shift = self.alpha * beta  # subtracted by subtract / gated
        self.beta_norm = float(beta.norm())
        self.unit = beta / self.beta_norm  # b
        self.mu_dot_unit = float(mu @ self.unit)  # <mu, b>, so s(x) = <x, b> - <mu, b> needs no (x - mu)
        self.threshold = float(directions.threshold)
        self.basis: torch.Tensor | None = None  # (k - 1, D): the extra directions of a rank-k project
        self.mu_dot_basis: torch.Tensor | None = None
        if directions.basis is not None and len(directions.basis) > 1:
            self.basis = directions.basis.to(self.device, torch.float32).reshape(len(directions.basis), -1)[1:]
            self.mu_dot_basis = self.basis @ mu

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Projection score s(x) = <x - mu, b> per sample."""
        return x.reshape(len(x), -1) @ self.unit - self.mu_dot_unit

    def check(self, x: torch.Tensor) -> None:
        if x.dtype != torch.float32:
            raise RepairInputError(f"features must be float32, got {x.dtype}")
        if tuple(x.shape[1:]) != self.feature_shape or x.ndim != len(self.feature_shape) + 1:
            raise RepairInputError(
                f"features must have shape (N, {', '.join(map(str, self.feature_shape))}), got {tuple(x.shape)}"
            )
        if x.device != self.device:
            raise RepairInputError(f"features are on {x.device}, the repair runs on {self.device}")
        # One reduction instead of an elementwise isfinite pass (~40x cheaper at batch 32): any NaN or Inf
        # makes the sum non-finite; so would finite values near 3e38, which no sane activation reaches.
        if x.numel() and not math.isfinite(float(x.sum())):
            raise RepairInputError("features contain NaN or Inf (non-finite values in the input image?)")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return self.repair_with_scores(x, inplace)[0]

    @torch.no_grad()
    def repair_with_scores(self, x: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The repaired features and each sample's projection score s(x) (read before the edit)."""
        self.check(x)
        if len(x) == 0:
            return x, x.new_zeros(0)
        if not x.is_contiguous():
            if inplace:
                raise RepairInputError("in-place repair needs a contiguous tensor")
            x = x.contiguous()
        flat = x.view(len(x), -1)
        out = flat if inplace else flat.clone()
        s = flat @ self.unit - self.mu_dot_unit  # read before any write: flat may alias out
        if self.mode == "subtract":
            out.sub_(self.shift)
        elif self.mode == "project":
            if self.basis is not None:
                extra = (flat @ self.basis.T - self.mu_dot_basis) * (s > 0).to(out.dtype)[:, None]
                out.addmm_(extra, self.basis, alpha=-self.alpha)
            out.addr_(s.clamp(min=0), self.unit, alpha=-self.alpha)
        else:  # gated
            out.addr_((s > self.threshold).to(out.dtype), self.shift, alpha=-1)
        return out.view(x.shape), s

    def changed(self, scores: torch.Tensor) -> int:
        """How many samples with these scores the repair moves (subtract: all)."""
        if self.mode == "subtract":
            return len(scores)
        return int((scores > (self.threshold if self.mode == "gated" else 0.0)).sum())
