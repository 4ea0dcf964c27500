"""The repair formula, once, for every array library (NumPy on CPU, torch on any device, ONNX by tracing).

Every repair mode is the same edit of the flattened features ``x`` (N, D):

    s(x) = x R^T - m                        k scores, read along the rows R (k, D), m = R mu
    C(s) = [s_1 > tau] * (s * w + c)        coefficients (N, k): a gate on the first score
    x'   = x - C(s(x)) V                    moved along k unit directions V (k, D)

with, from the direction file (b = beta / |beta|, mu the clean mean):

    mode       V                            R                    w       c              tau
    project    b, or the rank-k basis       the file's readout,  alpha   0              0 or -inf  (remove the
                                            else V                                      trigger component; -inf:
                                                                                        project_gate off)
    gated      b                            V                    0       alpha |beta|   threshold  (subtract where
                                                                                        s > tau)
    subtract   b                            V                    0       alpha |beta|   -inf       (everywhere)

A readout has R V^T = I (``calibration.estimators.oblique_readout``): a shift along the directions
reads back whole, and clean samples, read across their own spread, move little.

``scores``, ``gate`` and ``coefficients`` use array operators only, so they compute the same on NumPy
arrays and torch tensors. The forms FIRE serves are derived from them, and tested against each other:
``NumpyRepair`` here (the CPU repair model: in place, no torch in the process), and in
``fire_backend.repair`` the torch ``Repair`` (in place, any device: the GPU repair model) and
``RepairGraph`` (out of place, traced into the fused ONNX model).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from fire_backend.directions import MODES, DirectionFile
from fire_backend.errors import FireError, InvalidInputError
from fire_backend.names import FOLDED_INPUTS


class RepairInputError(FireError, ValueError):
    """The activation tensor cannot be repaired (shape, dtype, device or non-finite values)."""


@dataclass(frozen=True)
class RepairParams:
    """The parameters of the formula above, for one direction file, mode and alpha (float32 arrays)."""

    mode: str
    directions: np.ndarray  # V (k, D), orthonormal rows, the first b
    offsets: np.ndarray  # m = R mu (k,)
    weights: np.ndarray  # w (k,)
    shifts: np.ndarray  # c (k,)
    threshold: np.ndarray  # tau (1,)
    readout: np.ndarray  # R (k, D): the file's readout (project), else V
    feature_shape: tuple[int, ...]
    beta_norm: float
    tau: float  # the threshold as a number (the same on every device: the metrics compare NumPy scores with it)

    ARRAYS = ("directions", "offsets", "weights", "shifts", "threshold", "readout")

    @classmethod
    def from_directions(cls, d: DirectionFile, mode: str | None = None) -> RepairParams:
        mode = mode or d.mode
        if mode not in MODES:
            raise InvalidInputError(f"unknown repair mode {mode!r}; choose one of {MODES}")
        beta = np.asarray(d.beta, np.float64).reshape(-1)
        norm = float(np.linalg.norm(beta))
        if mode == "project" and d.basis is not None:
            v = np.asarray(d.basis, np.float64).reshape(len(d.basis), -1)
        else:
            v = (beta / norm)[None]
        k = len(v)
        if mode == "project":
            w, c, tau = np.full(k, float(d.alpha)), np.zeros(k), 0.0 if d.project_gate else -math.inf
        else:
            w, c = np.zeros(1), np.array([d.alpha * norm])
            tau = float(d.threshold) if mode == "gated" else -math.inf

        def f32(a) -> np.ndarray:
            return np.ascontiguousarray(a, dtype=np.float32)

        r = np.asarray(d.readout, np.float64).reshape(k, -1) if mode == "project" and d.readout is not None else v
        mu = np.asarray(d.mu, np.float64).reshape(-1)
        v32 = f32(v)
        r32 = v32 if r is v else f32(r)  # one array when R is V
        return cls(mode, v32, f32(r @ mu), f32(w), f32(c), f32([tau]), r32, tuple(d.feature_shape), norm,
                   float(tau))  # fmt: skip

    def to(self, convert: Callable[[np.ndarray], object]) -> RepairParams:
        """The same parameters as another library's arrays, e.g. ``lambda a: torch.from_numpy(a).cuda()``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        converted = {name: convert(values[name]) for name in self.ARRAYS if name != "readout"}
        same = self.readout is self.directions  # one array when R is V, on every device
        converted["readout"] = converted["directions"] if same else convert(self.readout)
        return RepairParams(**{**values, **converted})


# The formula. ``p`` is anything with the parameter attributes (RepairParams, RepairGraph's buffers).
def scores(flat, p):
    """s = x R^T - m: (N, k); the first column is the gate's score, <x - mu, R_1> (<x - mu, b> without a
    readout)."""
    return flat @ p.readout.T - p.offsets


def gate(s, p):
    """(N, 1): which samples the repair moves."""
    return s[:, :1] > p.threshold


def coefficients(s, p):
    """C = [s_1 > tau] * (s * w + c): (N, k), how far to move each sample along each direction."""
    return gate(s, p) * (s * p.weights + p.shifts)


def repaired(flat, p):
    """x - C(s(x)) V, out of place (the exportable form)."""
    return flat - coefficients(scores(flat, p), p) @ p.directions


def finite(total: float) -> bool:
    """Whether a float64 sum of the features is finite: NaN or Inf anywhere makes it non-finite, and no
    sum of finite float32 values overflows float64."""
    return math.isfinite(total)


class NumpyRepair:
    """The CPU serving form: ``repair(x, inplace=True)`` edits ``x``'s memory (a NumPy view of the
    request's tensor) row by row, only the rows the gate selects, with no allocation of the feature size."""

    def __init__(self, directions: DirectionFile, mode: str | None = None):
        self.params = RepairParams.from_directions(directions, mode)
        p = self.params
        self.mode, self.feature_shape, self.beta_norm = p.mode, p.feature_shape, p.beta_norm
        self._row = np.empty(self.params.directions.shape[1], dtype=np.float32)  # one row's correction

    def check(self, x: np.ndarray) -> None:
        if x.dtype != np.float32:
            raise RepairInputError(f"features must be float32, got {x.dtype}")
        if tuple(x.shape[1:]) != self.feature_shape or x.ndim != len(self.feature_shape) + 1:
            raise RepairInputError(
                f"features must have shape (N, {', '.join(map(str, self.feature_shape))}), got {tuple(x.shape)}"
            )
        if x.size and not finite(float(x.sum(dtype=np.float64))):
            raise RepairInputError("features contain NaN or Inf (non-finite values in the input image?)")

    def scores(self, x: np.ndarray) -> np.ndarray:
        return scores(x.reshape(len(x), -1), self.params)[:, 0]

    def repair_with_scores(self, x: np.ndarray, inplace: bool = False) -> tuple[np.ndarray, np.ndarray]:
        self.check(x)
        if len(x) == 0:
            return x, np.zeros(0, np.float32)
        if inplace and not x.flags.c_contiguous:
            raise RepairInputError("in-place repair needs a contiguous array")
        flat = x.reshape(len(x), -1) if inplace else np.array(x, dtype=np.float32, order="C").reshape(len(x), -1)
        s = scores(flat, self.params)
        c = coefficients(s, self.params)
        for i in np.flatnonzero(gate(s, self.params)[:, 0]):
            np.dot(c[i], self.params.directions, out=self._row)
            flat[i] -= self._row
        return flat.reshape(x.shape), s[:, 0]

    def __call__(self, x: np.ndarray, inplace: bool = False) -> np.ndarray:
        return self.repair_with_scores(x, inplace)[0]

    def changed(self, projection_scores: np.ndarray) -> int:
        return int((np.asarray(projection_scores) > self.params.threshold).sum())


def folded_inputs(p: RepairParams) -> dict[str, np.ndarray]:
    """``p`` as the folded graph's inputs (``names.FOLDED_INPUTS``): the graph's rank axis is dynamic, so a
    rank-k file is fed as it is, k rows (no padding: the repair's two products cost what its rank costs)."""
    return {FOLDED_INPUTS[i]: np.ascontiguousarray(getattr(p, name), np.float32) for i, name in enumerate(p.ARRAYS)}
