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
from dataclasses import dataclass

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


@dataclass(frozen=True)
class SpatialEstimate:
    beta: np.ndarray  # the mean difference (the first direction)
    basis: np.ndarray | None  # (k, D) orthonormal span of the views' differences, None for one view
    along: tuple[np.ndarray, ...] = ()  # each view's triggered features projected on basis[0], the gate's direction

    def directions(self, clean, **settings):
        """The direction file (``calibration.factory.make_directions``; ``settings``: its keyword arguments),
        its ``project_gate`` checked against its own mu (``estimators.gate_holds``)."""
        from calibration.estimators import covers
        from calibration.factory import make_directions

        d = make_directions(self.beta, clean, basis=self.basis, **settings)
        if self.basis is not None:
            b = np.asarray(self.basis[0], np.float64).reshape(-1)
            d.project_gate = covers(self.along, float(np.asarray(d.mu, np.float64).reshape(-1) @ b))
        return d


def spatial_estimate(features: Callable[[np.ndarray], np.ndarray], triggered: np.ndarray, other: np.ndarray,
                     paired: bool, augment: str) -> SpatialEstimate:  # fmt: skip
    """The estimate over the views of ``augment``: ``other`` is the originals of ``triggered`` (paired:
    per-pair differences, each view applied to both) or the clean reference (unpaired: one mean
    difference per view). beta is the mean difference; with more than one view, basis is the orthonormal
    (k, D) span of the differences, the mean's direction first (``estimators.principal_basis``), k the
    number of views. ``features``: uint8 NHWC images -> (N, ...) features.

    The project repair moves only samples past the clean mean along the first direction. When the views'
    shifts do not all point that way (a periodic pattern mirrored or shifted is the same pattern out of
    phase: the shifts cancel in the mean), that gate would skip a view's triggered images; so the file
    ``directions`` writes is not gated when fewer than ``estimators.GATE_COVERAGE`` of some view's
    triggered images pass it (``estimators.gate_holds``)."""
    t_views, o_views = [], []
    for view in views(augment):
        t_views.append(features(view(triggered)))
        o_views.append(features(view(other)))
    return estimate_from_views(t_views, o_views, paired)


def estimate_from_views(triggered_views: list[np.ndarray], other_views: list[np.ndarray],
                        paired: bool) -> SpatialEstimate:  # fmt: skip
    """``spatial_estimate`` from features already computed, one (N, ...) array per view: the triggered
    images' and their originals' (paired: row i of one is row i of the other) or the clean reference's
    (unpaired: only its mean enters; a (1, ...) mean does as well as the rows)."""
    from calibration.estimators import principal_basis

    diffs, flat = [], []
    for t, o in zip(triggered_views, other_views, strict=True):
        t, o = np.asarray(t, np.float64), np.asarray(o, np.float64)
        diffs.append(t - o if paired else (t.mean(0) - o.mean(0))[None])
        flat.append(t.reshape(len(t), -1))
    d = np.concatenate(diffs)
    beta = d.mean(0).astype(np.float32)
    if len(diffs) == 1:
        return SpatialEstimate(beta, None)
    basis = principal_basis(d, len(diffs))
    b = np.asarray(basis[0], np.float64).reshape(-1)
    return SpatialEstimate(beta, basis, tuple(t @ b for t in flat))
