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


GATE_COVERAGE = 0.9  # the least share of every view's triggered images the project gate must let through


@dataclass(frozen=True)
class SpatialEstimate:
    beta: np.ndarray  # the mean difference (the first direction)
    basis: np.ndarray | None  # (k, D) orthonormal span of the views' differences, None for one view
    project_gate: bool  # whether gating on the first direction still repairs every view's triggered images

    def directions(self, clean, **settings):
        """The direction file (``calibration.factory.make_directions``; ``settings``: its keyword arguments)."""
        from calibration.factory import make_directions

        return make_directions(self.beta, clean, basis=self.basis, project_gate=self.project_gate, **settings)


def spatial_estimate(features: Callable[[np.ndarray], np.ndarray], triggered: np.ndarray, other: np.ndarray,
                     paired: bool, augment: str) -> SpatialEstimate:  # fmt: skip
    """The estimate over the views of ``augment``: ``other`` is the originals of ``triggered`` (paired:
    per-pair differences, each view applied to both) or the clean reference (unpaired: one mean
    difference per view). beta is the mean difference; with more than one view, basis is the orthonormal
    (k, D) span of the differences, the mean's direction first (``estimators.principal_basis``), k the
    number of views. ``features``: uint8 NHWC images -> (N, ...) features.

    The project repair moves only samples past the clean mean along the first direction. When the views'
    shifts do not all point that way (a periodic pattern mirrored or shifted is the same pattern out of
    phase: the shifts cancel in the mean), that gate would skip a view's triggered images; then, if fewer
    than ``GATE_COVERAGE`` of some view's triggered images pass it, the repair is not gated."""
    from calibration.estimators import principal_basis

    diffs, scored = [], []
    for view in views(augment):
        t, o = features(view(triggered)).astype(np.float64), features(view(other)).astype(np.float64)
        diffs.append(t - o if paired else (t.mean(0) - o.mean(0))[None])
        scored.append(t)
        if len(scored) == 1:
            mu = o.mean(0)  # the images as they are: the clean side's mean
    d = np.concatenate(diffs)
    beta = d.mean(0)
    basis = principal_basis(d, len(diffs)) if len(diffs) > 1 else None
    return SpatialEstimate(beta.astype(np.float32), basis, basis is None or gate_holds(beta, mu, scored))


def gate_holds(beta, mu, triggered_views) -> bool:
    """Whether gating the project repair on ``beta`` (moving only samples past ``mu`` along it) still lets
    through ``GATE_COVERAGE`` of every view's triggered features (``triggered_views``: (N, ...) each)."""
    b = np.asarray(beta, np.float64).reshape(-1)
    b, m = b / np.linalg.norm(b), np.asarray(mu, np.float64).reshape(-1)
    cover = [float(((np.asarray(t, np.float64).reshape(len(t), -1) - m) @ b > 0).mean()) for t in triggered_views]
    return min(cover) >= GATE_COVERAGE
