"""Checks on client pixels, shared by the served head and local tools (no Triton imports here).

Policy: pixels are float32 in [0, 1]. NaN/Inf and values outside the range are rejected with
INVALID_ARG, never clamped: a silently "fixed" input is not the input the client sent.
"""

from __future__ import annotations

import math

import numpy as np


def range_problem(total: float, lo: float, hi: float, low: float, high: float) -> str | None:
    """The policy, from three reductions of the input (its float64 sum, min and max): any array library."""
    if not math.isfinite(total):
        return f"input contains NaN or Inf values; send finite pixels in [{low}, {high}]"
    if lo < low or hi > high:
        return f"input values span [{lo:.4g}, {hi:.4g}], outside the expected pixel range [{low}, {high}]"
    return None


def pixel_problem(x: np.ndarray, low: float = 0.0, high: float = 1.0) -> str | None:
    """None when ``x`` is acceptable, else a message naming the problem."""
    if x.size == 0:
        return None
    return range_problem(float(x.sum(dtype=np.float64)), float(x.min()), float(x.max()), low, high)


def finite_problem(x: np.ndarray) -> str | None:
    """None when every value is finite (one float64 reduction, no elementwise pass), else a message."""
    if x.size == 0 or np.isfinite(x.sum(dtype=np.float64)):
        return None
    return "features contain NaN or Inf; the model refuses them as the repair does"
