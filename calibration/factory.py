"""The one way a direction file is made from features.

``make_directions`` turns an estimated beta and the clean features into a ``DirectionFile`` (mu, the
gated threshold at a clean false-positive rate, optional rank-k basis, provenance). ``fit_directions``
is the paired case from features at one layer. Offline calibration, auto-calibration, the benchmarks
and streaming updates all build their files here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from calibration.estimators import (
    as_tensor,
    clean_threshold,
    gate_holds,
    oblique_readout,
    paired_direction,
    principal_basis,
    spread_of,
)
from fire_backend.directions import DirectionFile
from fire_backend.errors import InvalidInputError
from fire_backend.repair import Repair

READOUT_TOLERANCE = 1e-4  # a readout that reads the directions back less exactly (in float32) is not written


def make_directions(
    beta,
    clean,
    *,
    layer: str,
    mode: str = "project",
    alpha: float = 1.0,
    fpr: float = 0.01,
    estimator: str = "paired",
    head_sha256: str = "in-process",
    n_poisoned: int = 0,
    mu=None,
    threshold: float | None = None,
    basis=None,
    project_gate: bool = True,
    extra: dict | None = None,
) -> DirectionFile:
    """A direction file from ``beta`` and clean features ``clean`` (N, *feature shape).

    ``mu`` defaults to the clean mean; ``threshold`` (gated) to the clean score quantile at ``fpr``;
    ``basis`` (k, *feature shape) makes a rank-k project repair; ``project_gate`` off repairs every sample
    (``calibration.augment.spatial_estimate`` says when). A project repair reads its scores along the
    clean features' ``oblique_readout`` of its directions (none at alpha 0, from fewer than 2 clean
    samples, or where float32 cannot hold it to ``READOUT_TOLERANCE``: it reads along the directions)."""
    given, clean = clean, as_tensor(clean)
    beta = as_tensor(beta).float()
    mu = clean.double().mean(0).float() if mu is None else as_tensor(mu).float()
    d = DirectionFile(
        beta=beta.reshape(mu.shape),
        mu=mu,
        threshold=0.0 if threshold is None else float(threshold),
        layer=layer,
        mode=mode,
        alpha=alpha,
        head_sha256=head_sha256,
        estimator=estimator,
        n_poisoned=n_poisoned,
        n_clean=len(clean),
        fpr=fpr,
        extra=dict(extra or {}),
        basis=None if basis is None else as_tensor(basis).float().reshape(-1, *mu.shape),
        project_gate=bool(project_gate),
    )
    if threshold is None:
        d.threshold = clean_threshold(Repair(d, mode="gated").scores(clean).numpy(), fpr)
    if mode == "project" and alpha != 0 and len(clean) >= 2:  # alpha 0 (observe) moves nothing: read nothing
        readout = oblique_readout(d.unit_directions(), spread_of(given))
        if readout is not None:
            d.readout = readout.numpy().reshape(d.rank, *d.feature_shape)
            if d.readout_error() > READOUT_TOLERANCE:
                d.readout = None
    return d


@dataclass
class FitInputs:
    """Features the defender has at one layer: paired clean / triggered calibration images and clean ones."""

    pair_clean: torch.Tensor
    pair_poisoned: torch.Tensor
    clean: torch.Tensor  # for mu and the gated threshold
    views: int = 1  # the pairs are this many equal blocks, one per spatial view (calibration.augment)


def fit_directions(
    inputs: FitInputs,
    layer: str,
    mode: str = "project",
    alpha: float = 1.0,
    rank: int = 1,
    fpr: float = 0.01,
    estimator: str = "paired",
    head_sha256: str = "in-process",
    beta: torch.Tensor | None = None,
    extra: dict | None = None,
) -> DirectionFile:
    """The paired estimate (unless ``beta`` is given) at one layer, as a direction file."""
    if beta is None:
        beta = paired_direction(inputs.pair_clean, inputs.pair_poisoned)
    basis = None
    if rank > 1:
        diffs = (as_tensor(inputs.pair_poisoned).double() - as_tensor(inputs.pair_clean).double()).numpy()
        basis = principal_basis(diffs, rank)
    d = make_directions(
        beta, inputs.clean, layer=layer, mode=mode, alpha=alpha, fpr=fpr, estimator=estimator,
        head_sha256=head_sha256, n_poisoned=len(inputs.pair_poisoned), basis=basis, extra=extra,
    )  # fmt: skip
    if basis is not None and inputs.views > 1:
        n = len(inputs.pair_poisoned)
        if n % inputs.views:
            raise InvalidInputError(f"{n} triggered samples do not split into {inputs.views} equal views")
        per_view = np.split(as_tensor(inputs.pair_poisoned).numpy(), inputs.views)
        originals = np.split(as_tensor(inputs.pair_clean).numpy(), inputs.views)
        d.project_gate = gate_holds(d.gate_row(), d.mu, per_view, originals)
    return d
