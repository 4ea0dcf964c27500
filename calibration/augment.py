"""Spatial views for the estimate: what the model most likely also learned.

A model trained with flips and crops learns its trigger at more than one place: the same patch
mirrored or moved a few pixels also fires it, and an attacker who knows the backdoor will use that.
Nor does a model see its trigger at one size only: a patch drawn larger still fires it where the
features it builds from the patch do not depend on its exact size. The defender never sees those
variants, but can move the triggered images it has (and their clean reference, alike) the way an
attacker would move the trigger: each view gives its own shift in feature space, and the repair removes
the span of them (a rank-k ``project`` repair whose first direction is the mean shift). Views change
only where the pixels are, never their values (photometric views are the unpaired estimate's other
tool, ``estimators.photometric_views``).

- ``none``: the images as they are (rank 1);
- ``flips-shifts``: as they are, mirrored left-right, top-bottom and both, and moved by 2 and 4 px
  along both diagonals (10 views);
- ``flips-shifts-zooms`` (the default): those, and the images zoomed ``ZOOMS`` times about the trigger's
  centre (``trigger_centre``: where the triggered images differ from their reference), so that a trigger
  drawn larger keeps its place (12 views).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from fire_backend.errors import InvalidInputError
from fire_backend.names import AUGMENTS, FLIPS_SHIFTS, FLIPS_SHIFTS_ZOOMS

View = Callable[[np.ndarray], np.ndarray]  # uint8 NHWC -> uint8 NHWC


def _flip(axes: tuple[int, ...]) -> View:
    return lambda x: np.ascontiguousarray(np.flip(x, axes))


def _shift(dy: int, dx: int) -> View:
    return lambda x: np.roll(x, (dy, dx), (1, 2))


def _zoom(factor: float, centre: tuple[float, float] | None) -> View:
    """The image magnified ``factor`` times about ``centre`` (row, column; None: the image's centre),
    nearest pixel, the same size (what leaves the frame is cut off)."""

    def zoom(x: np.ndarray) -> np.ndarray:
        h, w = x.shape[1:3]
        cy, cx = ((h - 1) / 2, (w - 1) / 2) if centre is None else centre
        rows = np.clip(np.rint(cy + (np.arange(h) - cy) / factor), 0, h - 1).astype(int)
        cols = np.clip(np.rint(cx + (np.arange(w) - cx) / factor), 0, w - 1).astype(int)
        return np.ascontiguousarray(x[:, rows][:, :, cols])

    return zoom


ZOOMS = (1.25, 2.0)  # the zoom views' factors
_FLIPS_SHIFTS: list[View] = [lambda x: x, _flip((2,)), _flip((1,)), _flip((1, 2))] + [
    _shift(dy, dx) for dy, dx in ((2, 2), (-2, -2), (2, -2), (-2, 2), (4, 4), (-4, -4))
]


def zooms(name: str) -> bool:
    """Whether the views of ``name`` zoom (and so need the trigger's centre)."""
    if name not in AUGMENTS:
        raise InvalidInputError(f"augment must be one of {list(AUGMENTS)}, got {name!r}")
    return name == FLIPS_SHIFTS_ZOOMS


def without_zooms(name: str) -> str | None:
    """The views of ``name`` less its zooms (a prefix of its list), or None when it has none."""
    return FLIPS_SHIFTS if zooms(name) else None


def views(name: str, centre: tuple[float, float] | None = None) -> list[View]:
    """The views of ``name``, the identity first; zoom views magnify about ``centre`` (``trigger_centre``)."""
    zoom = zooms(name)  # an unknown name is refused here
    if name == "none":
        return [lambda x: x]
    return _FLIPS_SHIFTS + ([_zoom(f, centre) for f in ZOOMS] if zoom else [])


SIGNIFICANT = 3.0  # unpaired: a pixel is part of the trigger's footprint past this many standard errors
PIXEL_FLOOR = 1.0  # ... of a difference no smaller than one intensity level (a constant border is no trigger)
FOOTPRINT_TAIL = 0.05  # the centre: the middle of the footprint, less this share of its weight at each end


def _moments(images: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and variance (H, W, C) of uint8 NHWC ``images``, a chunk at a time in float64 (no
    float copy of the whole set: 1,000 images at 224 x 224 would be 1.2 GB)."""
    total = total_sq = 0.0
    for i in range(0, len(images), chunk):
        x = np.asarray(images[i : i + chunk], np.float64)
        total, total_sq = total + x.sum(0), total_sq + (x**2).sum(0)
    mean = total / len(images)
    return mean, np.maximum(total_sq / len(images) - mean**2, 0.0)


def _mean_abs_difference(a: np.ndarray, b: np.ndarray, chunk: int = 256) -> np.ndarray:
    """mean_i |a_i - b_i| per pixel, channels averaged (H, W), a chunk at a time."""
    total = 0.0
    for i in range(0, len(a), chunk):
        total = total + np.abs(np.asarray(a[i : i + chunk], np.float64) - b[i : i + chunk]).mean(-1).sum(0)
    return total / len(a)


def trigger_centre(triggered: np.ndarray, other: np.ndarray, paired: bool) -> tuple[float, float]:
    """Where the trigger sits (row, column), from pixels alone: the middle of its footprint, how much the
    triggered images differ from ``other`` (along each axis, halfway between where the first and the last
    ``FOOTPRINT_TAIL`` of that weight lie: a few stray pixels do not move it). Paired: each image from its
    original (the mean absolute difference: exactly the trigger's footprint). Unpaired: the two sets' mean
    images, where they differ by more than ``SIGNIFICANT`` standard errors of what the clean images' own
    spread would make of two sets of these sizes (the clean set's variance: a flagged set of a few, or of
    alike images, has none to speak of), weighted by the excess. A patch's centre is the patch's; a
    full-image trigger's, near the image's; the image's centre when no pixel stands out or fewer than two
    images were flagged. A flagged set shaped to mislead (a decoy region) misplaces only the zoom views,
    never the others."""
    h, w = triggered.shape[1:3]
    middle = ((h - 1) / 2, (w - 1) / 2)
    if len(triggered) == 0 or len(other) == 0 or (not paired and len(triggered) < 2):
        return middle
    if paired:
        weight = _mean_abs_difference(triggered, other)
    else:
        (t_mean, _), (o_mean, o_var) = _moments(triggered), _moments(other)
        error = np.sqrt(o_var * (1 / len(triggered) + 1 / len(other)))
        excess = np.abs(t_mean - o_mean) / np.maximum(error, PIXEL_FLOOR) - SIGNIFICANT
        weight = np.clip(excess, 0, None).sum(axis=-1)
    if not weight.sum() > 0:
        return middle
    centre = []
    for rest in (1, 0):  # rows (summed over columns), then columns
        share = np.cumsum(weight.sum(rest)) / weight.sum()
        first, last = np.searchsorted(share, FOOTPRINT_TAIL), np.searchsorted(share, 1 - FOOTPRINT_TAIL)
        centre.append(float(first + last) / 2)
    return centre[0], centre[1]


@dataclass(frozen=True)
class SpatialEstimate:
    beta: np.ndarray  # the mean difference (the first direction)
    basis: np.ndarray | None  # (k, D) orthonormal span of the views' differences, None for one view
    triggered_views: tuple[np.ndarray, ...] = ()  # each view's triggered features (the gate's check reads them)
    original_views: tuple[np.ndarray, ...] | None = None  # paired: their originals', row for row
    centre: tuple[float, float] | None = None  # where the zoom views magnified about (``trigger_centre``)

    def directions(self, clean, **settings):
        """The direction file (``calibration.factory.make_directions``; ``settings``: its keyword arguments),
        its ``project_gate`` checked against its own mu and gate row (``estimators.gate_holds``: the row
        depends on the clean features, through the readout)."""
        from calibration.estimators import gate_holds
        from calibration.factory import make_directions

        d = make_directions(self.beta, clean, basis=self.basis, **settings)
        if self.basis is not None:
            d.project_gate = gate_holds(d.gate_row(), d.mu, self.triggered_views, self.original_views)
        return d


def spatial_estimate(features: Callable[[np.ndarray], np.ndarray], triggered: np.ndarray, other: np.ndarray,
                     paired: bool, augment: str) -> SpatialEstimate:  # fmt: skip
    """The estimate over the views of ``augment`` (zooms about ``trigger_centre``): ``other`` is the
    originals of ``triggered`` (paired: per-pair differences, each view applied to both) or the clean
    reference (unpaired: one mean difference per view). beta is the mean difference; with more than one
    view, basis is the orthonormal (k, D) span of the differences, the mean's direction first
    (``estimators.principal_basis``), k the number of views. ``features``: uint8 NHWC images -> (N, ...)
    features.

    The project repair moves only samples past the clean mean along the first direction. When the views'
    shifts do not all point that way (a periodic pattern mirrored or shifted is the same pattern out of
    phase: the shifts cancel in the mean), or when a trigger at half its strength would slide under it
    (a shift small beside the spread of clean features: a dimmed trigger evades the gate), that gate
    would skip triggered images; so the file ``directions`` writes is not gated unless it passes
    ``estimators.GATE_COVERAGE`` of every view's triggered images at full and at half their shift
    (``estimators.covers``)."""
    centre = trigger_centre(triggered, other, paired) if zooms(augment) else None
    t_views, o_views = [], []
    for view in views(augment, centre):
        t_views.append(features(view(triggered)))
        o_views.append(features(view(other)))
    return replace(estimate_from_views(t_views, o_views, paired), centre=centre)


def estimate_from_views(triggered_views: list[np.ndarray], other_views: list[np.ndarray],
                        paired: bool) -> SpatialEstimate:  # fmt: skip
    """``spatial_estimate`` from features already computed, one (N, ...) array per view: the triggered
    images' and their originals' (paired: row i of one is row i of the other) or the clean reference's
    (unpaired: only its mean enters; a (1, ...) mean does as well as the rows)."""
    from calibration.estimators import principal_basis

    diffs = []
    for t, o in zip(triggered_views, other_views, strict=True):
        t, o = np.asarray(t, np.float64), np.asarray(o, np.float64)
        diffs.append(t - o if paired else (t.mean(0) - o.mean(0))[None])
    d = np.concatenate(diffs)
    beta = d.mean(0).astype(np.float32)
    if len(diffs) == 1:
        return SpatialEstimate(beta, None)
    basis = principal_basis(d, len(diffs))
    return SpatialEstimate(beta, basis, tuple(triggered_views), tuple(other_views) if paired else None)
