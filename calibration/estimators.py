"""Direction estimators over feature batches. Means are running (batched Chan/Welford updates), so no
estimator keeps every sample: the same code serves offline calibration and streaming updates."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

FeatureFn = Callable[[np.ndarray], np.ndarray]  # uint8 NHWC images -> float32 features (N, ...)


class RunningMean:
    """Numerically stable running mean of feature tensors (float64 accumulator)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None

    def update(self, batch: np.ndarray) -> None:
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
            raise ValueError("no samples seen")
        return self.mean.astype(np.float32)


def _batches(images: np.ndarray, batch_size: int) -> Iterable[np.ndarray]:
    for i in range(0, len(images), batch_size):
        yield images[i : i + batch_size]


def mean_features(features: FeatureFn, images: np.ndarray, batch_size: int = 256) -> RunningMean:
    acc = RunningMean()
    for chunk in _batches(images, batch_size):
        acc.update(features(chunk))
    return acc


def paired_direction(features: FeatureFn, clean: np.ndarray, poisoned: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """beta = mean_i f(poisoned_i) - f(clean_i): the same images with and without the trigger."""
    if clean.shape != poisoned.shape:
        raise ValueError(f"paired sets must have the same shape, got {clean.shape} and {poisoned.shape}")
    acc = RunningMean()
    for c, p in zip(_batches(clean, batch_size), _batches(poisoned, batch_size), strict=True):
        acc.update(features(p) - features(c))
    return acc.value()


def photometric_views(images: np.ndarray, views: int, seed: int = 0) -> np.ndarray:
    """``views`` jittered copies of each image (brightness, contrast, pixel noise).

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


def unpaired_direction(
    features: FeatureFn, clean: np.ndarray, poisoned: np.ndarray, views: int = 4, seed: int = 0, batch_size: int = 256
) -> np.ndarray:
    """beta = mean f(poisoned set) - mean f(clean set), two unrelated sets, each averaged over views."""
    p = mean_features(features, photometric_views(poisoned, views, seed), batch_size).value()
    c = mean_features(features, photometric_views(clean, views, seed + 1), batch_size).value()
    return p - c


def clean_threshold(scores: np.ndarray, fpr: float) -> float:
    """The score above which only a ``fpr`` share of clean samples lie."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    return float(np.quantile(scores, 1.0 - fpr))


def principal_basis(differences: np.ndarray, rank: int) -> np.ndarray:
    """An orthonormal (rank, D) basis for paired feature differences (N, D): the first row is the mean
    difference's direction, the others the top principal directions of what the mean leaves over."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    d = differences.reshape(len(differences), -1).astype(np.float64)
    mean = d.mean(axis=0)
    first = mean / np.linalg.norm(mean)
    if rank == 1:
        return first[None].astype(np.float32)
    residual = d - np.outer(d @ first, first)
    residual -= residual.mean(axis=0)
    _, _, vt = np.linalg.svd(residual, full_matrices=False)
    rows = [first]
    for v in vt:  # Gram-Schmidt against what we have (they are orthogonal up to round-off)
        for r in rows:
            v = v - (v @ r) * r
        norm = np.linalg.norm(v)
        if norm > 1e-6:
            rows.append(v / norm)
        if len(rows) == rank:
            break
    return np.stack(rows).astype(np.float32)
