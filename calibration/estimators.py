"""Direction estimators over features (torch tensors or NumPy arrays, N samples first).

Every estimator here sees features, never images: turning images into features is the caller's job
(the deployed ONNX head, the in-process torch head, or the server's head for streaming updates), so
offline calibration, auto-calibration, benchmarks and streaming updates share one estimator each.
Means are accumulated in float64 (``RunningMean`` for streams, nothing kept but the mean and count)."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np
import torch

from fire_backend.errors import InvalidInputError


class RunningMean:
    """Numerically stable running mean of feature tensors (float64 accumulator)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None

    def update(self, batch) -> None:
        batch = np.asarray(batch)
        if len(batch) == 0:
            return
        batch_mean = batch.astype(np.float64).mean(axis=0)
        n = len(batch)
        if self.mean is None:
            self.mean, self.count = batch_mean, n
            return
        self.count += n
        self.mean += (batch_mean - self.mean) * (n / self.count)

    def value(self) -> np.ndarray:
        if self.mean is None:
            raise InvalidInputError("no samples seen")
        return self.mean.astype(np.float32)

    @classmethod
    def of(cls, batch) -> RunningMean:
        r = cls()
        r.update(batch)
        return r


def _numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


FeatureFn = Callable[[np.ndarray], np.ndarray]  # images -> features (N, ...)


def mean_features(features: FeatureFn, images: np.ndarray, batch_size: int = 256) -> RunningMean:
    """The running mean of ``features(images)``, computed batch by batch (no feature is kept)."""
    acc = RunningMean()
    for i in range(0, len(images), batch_size):
        acc.update(_numpy(features(images[i : i + batch_size])))
    return acc


def paired_direction(clean, poisoned) -> torch.Tensor:
    """beta = mean_i f(T(x_i)) - f(x_i): features of the same images without and with the trigger."""
    if tuple(clean.shape) != tuple(poisoned.shape):
        raise InvalidInputError(
            f"paired sets must have the same shape, got {tuple(clean.shape)} and {tuple(poisoned.shape)}"
        )
    if len(clean) == 0:
        raise InvalidInputError("no paired samples")
    diffs = _numpy(poisoned).astype(np.float64) - _numpy(clean)
    return torch.from_numpy(RunningMean.of(diffs).value())


def unpaired_direction(clean: RunningMean, poisoned: RunningMean) -> torch.Tensor:
    """beta = mean f(poisoned set) - mean f(clean set), two unrelated sets given as running means (an
    offline set and a stream of reports alike)."""
    if not (clean.count and poisoned.count):
        raise InvalidInputError("the unpaired estimate needs clean and triggered samples")
    return torch.from_numpy((poisoned.mean - clean.mean).astype(np.float32))


REFERENCE_MIN_SHARE = 0.1  # below this share of the clean images, the reference falls back to all of them


def reference_too_small(n_reference: int, n_clean: int) -> bool:
    """Whether a reference of ``n_reference`` of ``n_clean`` clean images is too small to compare with
    (``unpaired_reference`` then falls back to every clean image)."""
    return n_reference < max(2, REFERENCE_MIN_SHARE * n_clean)


def unpaired_reference(clean_predicted: np.ndarray, triggered_predicted: np.ndarray) -> tuple[np.ndarray, int | None]:
    """Which clean images the unpaired estimate compares the triggered ones with: those the model does not
    put in the class the triggered images go to (their most common prediction), since a triggered image
    is an image of another class with the trigger on. With every clean image as the reference, the
    difference of class make-ups enters beta (on two classes it can cancel the trigger's shift). Returns
    (mask over the clean images, that class); all clean images (and None) when too few would remain."""
    clean_predicted, triggered_predicted = np.asarray(clean_predicted), np.asarray(triggered_predicted)
    if not len(triggered_predicted) or not len(clean_predicted):
        return np.ones(len(clean_predicted), bool), None
    target = int(np.bincount(triggered_predicted).argmax())
    mask = clean_predicted != target
    if reference_too_small(int(mask.sum()), len(mask)):
        return np.ones(len(clean_predicted), bool), None
    return mask, target


TRIGGER_EVIDENCE = 0.2  # the least excess share of its most common class that shows a set is triggered


def not_triggered(clean_predicted: np.ndarray, triggered_predicted: np.ndarray) -> str | None:
    """Why the triggered (or flagged) images may carry no trigger the model responds to, or None: the
    model sends them to their most common class no more often (by ``TRIGGER_EVIDENCE``) than it sends
    clean images there. A direction from such images is noise, and the cut search's scores say little.
    An all-to-all backdoor (each class to another) spreads its images too: the message says so."""
    clean_predicted, triggered_predicted = np.asarray(clean_predicted), np.asarray(triggered_predicted)
    if not len(clean_predicted) or not len(triggered_predicted):
        return None
    target = int(np.bincount(triggered_predicted).argmax())
    share_t, share_c = float((triggered_predicted == target).mean()), float((clean_predicted == target).mean())
    if share_t - share_c >= TRIGGER_EVIDENCE:
        return None
    return (f"the model sends {100 * share_t:.0f} % of the triggered images to their most common class ({target}), "
            f"and {100 * share_c:.0f} % of the clean ones: they may carry no trigger it responds to, and the "
            "direction found from them would be noise (unless the backdoor sends each class to a different "
            "one); check the images you flagged, or the trigger you named")  # fmt: skip


def photometric_views(images: np.ndarray, views: int, seed: int = 0) -> np.ndarray:
    """``views`` jittered copies of each uint8 NHWC image (brightness, contrast, pixel noise).

    Spatial augmentations (crops, flips) are left out on purpose: they would move a position-bound
    trigger such as a corner patch, and smear the direction being estimated."""
    rng = np.random.default_rng(seed)
    x = np.repeat(images.astype(np.float32), views, axis=0)
    n = len(x)
    brightness = rng.uniform(-20, 20, size=(n, 1, 1, 1))
    contrast = rng.uniform(0.85, 1.15, size=(n, 1, 1, 1))
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * contrast + mean + brightness + rng.normal(0, 3, size=x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def clean_threshold(scores, fpr: float) -> float:
    """The score above which only a ``fpr`` share of clean samples lie."""
    if not 0 < fpr < 1:
        raise InvalidInputError(f"fpr must be in (0, 1), got {fpr}")
    return float(np.quantile(np.asarray(scores), 1.0 - fpr))


class CleanSpread:
    """The clean features' covariance, shrunk toward a multiple of the identity by Ledoit and Wolf's rule
    (O. Ledoit, M. Wolf, "A well-conditioned estimator for large-dimensional covariance matrices", J.
    Multivariate Anal. 88(2), 2004: the intensity that minimises the expected squared error, estimated
    from the samples themselves), kept as the eigen-decomposition of the N x N Gram matrix: with far fewer
    images than features, everything ``oblique_readout`` needs costs N x D per direction, not D x D.

    Sigma = (1 - lam) S + lam m I, S = Xc^T Xc / N (Xc the centred features), m = tr(S) / D."""

    def __init__(self, clean):
        x = as_tensor(clean).float().reshape(len(clean), -1)
        self.n, self.dim = x.shape
        self.centred = x - x.double().mean(0).float()
        gram = (self.centred @ self.centred.T).double()  # float32 product, float64 from here on
        n, dim = self.n, self.dim
        trace = float(torch.trace(gram)) / n
        self.m = trace / dim
        s_f2 = float((gram**2).sum()) / n**2  # ||S||_F^2
        d2 = s_f2 - dim * self.m**2  # ||S - m I||_F^2
        norms2 = torch.diagonal(gram)
        b2 = float((norms2**2).sum() - 2 * (gram**2).sum() / n + n * s_f2) / n**2  # mean ||x x^T - S||_F^2 / n
        self.lam = 1.0 if d2 <= 0 else min(max(b2, 0.0), d2) / d2
        g, u = torch.linalg.eigh(gram)
        keep = g > 1e-9 * max(float(g.max()), 1e-300)
        self.g, self.u = g[keep], u[:, keep]  # Gram eigenpairs: S = P diag(g / n) P^T, P = Xc^T U g^-1/2

    def inverse_times(self, v: torch.Tensor) -> torch.Tensor | None:
        """Sigma^-1 V^T (D, k) for rows ``v`` (k, D), up to one positive factor (None: Sigma is no matrix
        to invert, all the clean features alike)."""
        a = self.lam * self.m
        if not a > 0:
            return None
        e = (1 - self.lam) * self.g / self.n  # S's eigenvalues, shrunk
        scaled = self.u / self.g.sqrt()  # P = Xc^T scaled
        # the N x D products in float32 (the features' own precision), the small ones in float64
        coords = scaled.T @ (self.centred @ v.float().T).double()  # P^T V^T (r, k)
        back = (self.centred.T @ (scaled @ ((e / (e + a))[:, None] * coords)).float()).double()
        return v.double().T - back  # a * Sigma^-1 V^T


_SPREADS: dict[int, tuple] = {}  # id of a clean features array -> (a weak reference to it, its fingerprint, spread)


def _fingerprint(x) -> tuple:
    """The array's shape and float64 sum: an array edited in place (through any view of its memory) since
    is computed again. A pass over the features, nothing beside the N x N Gram it saves."""
    total = torch.sum(x, dtype=torch.float64) if isinstance(x, torch.Tensor) else np.sum(x, dtype=np.float64)
    return tuple(x.shape), float(total)


def spread_of(clean) -> CleanSpread:
    """``CleanSpread`` of clean features (a torch tensor or a NumPy array), computed once while that array
    lives unchanged (the cut search fits a repair per view set and strength on the same clean fold, the
    traffic search one per class: one N x N Gram each). Anything that cannot be weakly referenced is
    computed every time."""
    key = id(clean)
    try:
        ref = weakref.ref(clean, lambda _: _SPREADS.pop(key, None))
    except TypeError:
        return CleanSpread(clean)
    mark, cached = _fingerprint(clean), _SPREADS.get(key)
    if cached is not None and cached[0]() is clean and cached[1] == mark:
        return cached[2]
    _SPREADS[key] = (ref, mark, CleanSpread(clean))
    return _SPREADS[key][2]


def oblique_readout(directions, spread: CleanSpread):
    """The rows R (k, D) a project repair reads its k scores along, for its unit directions V (k, D): of
    all R with R V^T = I (a shift along the directions reads back exactly, so the repair removes it
    whole), the one whose scores vary least over clean features, R = (V Sigma^-1 V^T)^-1 V Sigma^-1
    (``CleanSpread``'s Sigma). Reading along V itself (R = V) moves every clean sample by its own spread
    along V; this reads across the clean spread instead, so the same trigger shift is removed while clean
    samples move far less (a minimum-variance unbiased read-out, the Gauss-Markov estimate of the shift's
    coordinates). float32 rows; None when there is nothing to invert (``CleanSpread.inverse_times``)."""
    v = as_tensor(directions).double().reshape(len(directions), -1)
    y = spread.inverse_times(v)
    if y is None:
        return None
    readout = torch.linalg.solve(v @ y, y.T)  # (V Y)^-1 Y^T; V Y is symmetric
    if not bool(torch.isfinite(readout).all()):
        return None
    return readout.float()


def as_tensor(x) -> torch.Tensor:
    """``x`` as a torch tensor (a NumPy array's memory shared, made contiguous first)."""
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def principal_basis(differences, rank: int) -> np.ndarray:
    """An orthonormal (rank, D) basis for paired feature differences (N, D): the first row is the mean
    difference's direction, the others the top principal directions of what the mean leaves over (fewer
    rows when what it leaves over has fewer directions with any spread)."""
    if rank < 1:
        raise InvalidInputError(f"rank must be >= 1, got {rank}")
    d = np.asarray(differences).reshape(len(differences), -1).astype(np.float64)
    mean = d.mean(axis=0)
    first = mean / np.linalg.norm(mean)
    if rank == 1:
        return first[None].astype(np.float32)
    residual = d - np.outer(d @ first, first)
    residual -= residual.mean(axis=0)
    rows = [first]
    spread = _right_singular_vectors(residual, 1e-12 * float((d**2).sum()))  # round-off is no direction
    for v in spread:  # Gram-Schmidt against what we have (orthogonal up to round-off)
        for r in rows:
            v = v - (v @ r) * r
        norm = np.linalg.norm(v)
        if norm > 1e-6:
            rows.append(v / norm)
        if len(rows) == rank:
            break
    return np.stack(rows).astype(np.float32)


def _right_singular_vectors(x: np.ndarray, floor: float) -> np.ndarray:
    """The right singular vectors of ``x`` (N, D) whose squared singular value is above ``floor``, largest
    first. With fewer rows than columns (pairs x views against a feature map) from the N x N Gram
    matrix: the same vectors as ``np.linalg.svd`` (up to sign) at a fraction of its time."""
    if len(x) >= x.shape[1]:
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        return vt[s**2 > floor]
    w, u = np.linalg.eigh(x @ x.T)
    order = np.argsort(w)[::-1]
    w, u = w[order], u[:, order]
    keep = w > floor
    return (u[:, keep].T @ x) / np.sqrt(w[keep])[:, None]


GATE_COVERAGE = 0.9  # the least share of every view's (or class's) triggered samples the project gate must pass
GATE_STRENGTH = 0.5  # ... also at this share of their strength, as the calibration samples carry it (dimmed)


def covers(along, mu_along: float, originals=None) -> bool:
    """Whether at least ``GATE_COVERAGE`` of every view's triggered projections ``along`` lie past
    ``mu_along``, as they are and with their trigger at ``GATE_STRENGTH`` of its strength: paired (the
    ``originals``' projections, view by view), each sample at that share of the way from its original
    (where it lies with the trigger dimmed, exactly so where the features are linear in the pixels);
    unpaired, each moved back by the rest of its view's median shift past ``mu_along`` (the median, so
    that a few samples far past the gate cannot raise the bar for the others). A gate that fails this
    lets a dimmed trigger through unrepaired. The strength is relative to the calibration samples': a
    gate checked on samples stronger than the attacker's trigger is checked against a weaker dimming."""

    def passes(a: np.ndarray, o: np.ndarray | None) -> bool:
        if not len(a):
            return False
        if o is not None:
            weaker = o + GATE_STRENGTH * (a - o)
        else:
            weaker = a - (1 - GATE_STRENGTH) * max(float(np.median(a)) - mu_along, 0.0)
        return all(float((x > mu_along).mean()) >= GATE_COVERAGE for x in (a, weaker))

    pairs = zip(along, originals, strict=True) if originals is not None else ((a, None) for a in along)
    return all(passes(np.asarray(a, np.float64), None if o is None else np.asarray(o, np.float64)) for a, o in pairs)


def gate_holds(direction, mu, triggered_views, original_views=None) -> bool:
    """Whether gating a project repair on ``direction`` (it moves only samples past ``mu`` along it: the
    file's ``gate_row()`` and ``mu``) still lets through ``GATE_COVERAGE`` of every view's (or class's)
    triggered features (``triggered_views``: (N, ...) arrays), also dimmed (``covers``; paired: the
    ``original_views`` of the same rows)."""
    b = np.asarray(direction, np.float64).reshape(-1)

    def along(views) -> list[np.ndarray]:
        return [np.asarray(t, np.float64).reshape(len(t), -1) @ b for t in views]

    originals = None if original_views is None else along(original_views)
    return covers(along(triggered_views), float(np.asarray(mu, np.float64).reshape(-1) @ b), originals)
