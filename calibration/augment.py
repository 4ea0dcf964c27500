"""Spatial views for the estimate: what the model most likely also learned.

A model trained with flips and crops learns its trigger at more than one place: the same patch
mirrored or moved a few pixels also fires it, and an attacker who knows the backdoor will use that.
The defender never sees those variants, but can move the triggered images it has (and their clean
reference, alike) the way training moved images: each view gives its own shift in feature space, and
the repair removes the span of them (a rank-k ``project`` repair whose first direction is the mean
shift). Views change only where the pixels are, never their values (photometric views are the
unpaired estimate's other tool, ``estimators.photometric_views``).

- ``none``: the images as they are (rank 1);
- ``flips-shifts``: as they are, mirrored left-right, top-bottom and both, and moved by 2 and 4 px
  along both diagonals (10 views).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fire_backend.errors import InvalidInputError

View = Callable[[np.ndarray], np.ndarray]  # uint8 NHWC -> uint8 NHWC


def _flip(axes: tuple[int, ...]) -> View:
    return lambda x: np.ascontiguousarray(np.flip(x, axes))


def _shift(dy: int, dx: int) -> View:
    return lambda x: np.roll(x, (dy, dx), (1, 2))


AUGMENTS: dict[str, list[View]] = {
    "none": [lambda x: x],
    "flips-shifts": [lambda x: x, _flip((2,)), _flip((1,)), _flip((1, 2))]
    + [_shift(dy, dx) for dy, dx in ((2, 2), (-2, -2), (2, -2), (-2, 2), (4, 4), (-4, -4))],
}


def views(name: str) -> list[View]:
    if name not in AUGMENTS:
        raise InvalidInputError(f"augment must be one of {sorted(AUGMENTS)}, got {name!r}")
    return AUGMENTS[name]


def spatial_estimate(features: Callable[[np.ndarray], np.ndarray], triggered: np.ndarray, other: np.ndarray,
                     paired: bool, augment: str) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """(beta, basis) over the views of ``augment``: ``other`` is the originals of ``triggered`` (paired:
    per-pair differences, each view applied to both) or the clean reference (unpaired: one mean
    difference per view). beta is the mean difference; with more than one view, basis is the orthonormal
    (k, D) span of the differences, the mean's direction first (``estimators.principal_basis``), k the
    number of views. ``features``: uint8 NHWC images -> (N, ...) features."""
    from calibration.estimators import principal_basis

    diffs = []
    for view in views(augment):
        t, o = features(view(triggered)).astype(np.float64), features(view(other)).astype(np.float64)
        diffs.append(t - o if paired else (t.mean(0) - o.mean(0))[None])
    d = np.concatenate(diffs)
    beta = d.mean(0).astype(np.float32)
    basis = principal_basis(d, len(diffs)) if len(diffs) > 1 else None
    return beta, basis
