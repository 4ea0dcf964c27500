"""Checks on client pixels, shared by the served head and local tools (no Triton imports here).

Policy: pixels are float32 in [0, 1]. NaN/Inf and values outside the range are rejected with
INVALID_ARG, never clamped: a silently "fixed" input is not the input the client sent.
"""

from __future__ import annotations

import numpy as np


def pixel_problem(x: np.ndarray, low: float = 0.0, high: float = 1.0) -> str | None:
    """None when ``x`` is acceptable, else a message naming the problem."""
    if x.size == 0:
        return None
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        return f"input contains {bad} NaN or Inf value(s); send finite pixels in [{low}, {high}]"
    lo, hi = float(x.min()), float(x.max())
    if lo < low or hi > high:
        return f"input values span [{lo:.4g}, {hi:.4g}], outside the expected pixel range [{low}, {high}]"
    return None


def finite_problem(x: np.ndarray) -> str | None:
    """None when every value is finite (one float64 reduction, no elementwise pass), else a message."""
    if x.size == 0 or np.isfinite(x.sum(dtype=np.float64)):
        return None
    return "features contain NaN or Inf; the model refuses them as the repair does"
