"""FIRE without the trigger: find the backdoor direction in unlabeled traffic.

Triggered inputs all land in the attacker's class, and there they pull that class's features away from
where its clean members sit: the triggered images come from every class and carry the trigger's shift.
From the server's bounded traffic statistics (``fire_backend.traffic.TrafficStats``: per predicted
class a reservoir of feature vectors, fair between sources) and the defender's own clean images (the
reference: those the model puts in each class):

1. **Detect.** Per class with enough traffic and reference samples, a two-sample mean-shift statistic
   T = |traffic mean - reference mean|^2 / (its expected value without a shift: the summed per-feature
   variances over the sample counts); about 1 when traffic and reference agree. Both come from the
   reservoir, where no source holds more than any other, so one client flooding a class with clean
   requests cannot dilute it more than any other client's share does. A shift common to every class
   (traffic that differs from the reference, a trigger the model never learned) raises every T; a
   backdoor raises one. Score = T / the median T of the other classes (with two classes, the other
   one's: the model needs two classes with traffic and reference images); every class above ``min_score`` is
   examined (a decoy class cannot hide the real one), the first whose direction passes the checks is
   proposed. Non-finite statistics raise (fail closed: never "no backdoor" from a poisoned file).
2. **Estimate.** In the suspect class, project the reservoir onto the shift and split it with 2-means:
   the samples on the far side are flagged as triggered. beta = their mean - the mean of the clean
   reference features (with two classes, of the other class's: the target's own half would cancel
   half the shift); mu = the clean mean (as the unpaired estimator).
3. **Check, without labels.** Fit on half of the suspect class's reservoir, check on the other half:
   the flagged samples must leave the suspect class (``min_leave``), every other traffic sample keep its
   prediction (``max_other_change``), and the defender's clean images lose at most ``max_ca_drop``
   points of accuracy (with labels; else change at most that share of predictions). Only a proposal that
   passes every check is deployed automatically; the numbers are shown either way.

What it cannot see: a trigger whose features sit where the target class's clean features already are
(at the repair layer), and a triggered share of the target class's traffic too small for the mean to
move past sampling noise (results/efficacy_traffic.md measures both).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from calibration.estimators import gate_holds
from calibration.factory import make_directions
from fire_backend.directions import DirectionFile
from fire_backend.formula import NumpyRepair
from fire_backend.traffic import TrafficStats, TrafficStatsError

Tail = Callable[[np.ndarray], np.ndarray]  # features (N, ...) -> predicted labels (N,)


@dataclass
class TrafficConfig:
    min_class_samples: int = 10  # traffic samples a class needs to be scored
    min_reference: int = 5  # and clean reference images the model puts in it
    min_score: float = 2.0  # T of the suspect class over the median T: above it, a backdoor is reported
    restarts: int = 5  # 2-means restarts
    min_cluster_share: float = 0.03  # the flagged cluster holds at least this share of its class's reservoir
    min_leave: float = 0.5  # held-out flagged samples that must leave the suspect class after the repair
    max_other_change: float = 0.01  # held-out other traffic whose prediction may change
    max_ca_drop: float = 0.3  # points of clean accuracy (or percent of clean predictions) it may cost
    seed: int = 0


@dataclass
class ClassShift:
    cls: int
    samples: int  # traffic samples recorded in the class
    reference: int  # clean reference images the model puts in it
    t: float  # the mean-shift statistic (about 1 without a shift)
    score: float = 0.0  # t over the median t of the classes
    sources: int = 1  # sources holding a share of the class's reservoir
    largest_share: float = 1.0  # of the reservoir held by one source (fairness caps it at the others' shares)


@dataclass
class Proposal:
    detected: bool  # a class stood out (the statistical test)
    target: int | None
    score: float  # of the suspect class
    next_score: float  # and of the runner-up
    classes: list[ClassShift]
    directions: DirectionFile | None = None
    examined: list[int] = field(default_factory=list)  # the classes above the threshold, in score order
    targets: list[int] = field(default_factory=list)  # with several classes repaired at once: all of them
    fit_directions: DirectionFile | None = field(default=None, repr=False)  # fitted on half, checked on the rest
    held: dict = field(default_factory=dict, repr=False)  # class -> (held-out flagged, unflagged) samples
    flagged_share: float = 0.0  # of the suspect class's reservoir
    leave_rate: float = 0.0  # held-out flagged samples that leave the suspect class after the repair
    other_change: float = 0.0  # held-out other traffic whose prediction changes
    ca_drop: float = 0.0  # points (or percent of predictions changed, without labels) on the clean images
    traffic_changed: float = 0.0  # share of all recorded traffic the repair would change
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def deployable(self) -> bool:
        return self.detected and self.directions is not None and all(self.checks.values())


def _two_means(z: np.ndarray, restarts: int, rng: np.random.Generator) -> np.ndarray:
    """Labels (0/1) of the best of ``restarts`` 2-means runs (k-means++ start, Lloyd iterations)."""
    best, best_cost = None, np.inf
    for _ in range(restarts):
        a = z[rng.integers(len(z))]
        d = ((z - a) ** 2).sum(1)
        b = z[rng.choice(len(z), p=d / d.sum())] if d.sum() > 0 else z[rng.integers(len(z))]
        centers = np.stack([a, b])
        for _ in range(50):
            labels = ((z[:, None] - centers[None]) ** 2).sum(2).argmin(1)
            new = np.stack([z[labels == k].mean(0) if (labels == k).any() else centers[k] for k in (0, 1)])
            if np.allclose(new, centers):
                break
            centers = new
        cost = ((z - centers[labels]) ** 2).sum()
        if cost < best_cost:
            best, best_cost = labels, cost
    return best


def class_shifts(stats: TrafficStats, clean_flat: np.ndarray, clean_predicted: np.ndarray,
                 cfg: TrafficConfig) -> list[ClassShift]:  # fmt: skip
    """The mean-shift statistic of every class with enough traffic and reference samples."""
    shifts = []
    for c in range(stats.num_classes):
        x, ref = stats.samples(c), clean_flat[clean_predicted == c]
        if len(x) < cfg.min_class_samples or len(ref) < cfg.min_reference:
            continue
        d = x.mean(0, dtype=np.float64) - ref.mean(0, dtype=np.float64)
        noise = x.var(0, dtype=np.float64).sum() / len(x) + ref.var(0, dtype=np.float64).sum() / len(ref)
        t = float(d @ d / max(noise, 1e-12))
        if not np.isfinite(t):
            raise TrafficStatsError(f"class {c}: the traffic statistics are not finite; refusing to judge them "
                                    "(delete the traffic file to start recording afresh)")  # fmt: skip
        shifts.append(ClassShift(c, len(x), len(ref), t, sources=stats.class_sources(c),
                                 largest_share=stats.largest_source_share(c)))  # fmt: skip
    return shifts


def propose(
    stats: TrafficStats,
    clean_features: np.ndarray,
    clean_predicted: np.ndarray,
    tail: Tail,
    *,
    layer: str,
    head_sha256: str,
    clean_labels: np.ndarray | None = None,
    cfg: TrafficConfig | None = None,
) -> Proposal:
    """Detect, estimate and check a direction from traffic statistics (see the module docstring).

    ``clean_features``: the defender's clean images at the repair layer, ``clean_predicted`` the model's
    labels for them, ``clean_labels`` their true labels if known; ``tail``: features -> labels."""
    cfg = cfg or TrafficConfig()
    clean_flat = clean_features.reshape(len(clean_features), -1)
    shifts = class_shifts(stats, clean_flat, clean_predicted, cfg)
    if len(shifts) < 2:  # nothing to hold a class's statistic against
        return Proposal(False, None, 0.0, 0.0, shifts)
    for s in shifts:  # against the other classes' (two classes: the other one's), so a shared shift cancels
        others = [o.t for o in shifts if o is not s]
        s.score = s.t / max(float(np.median(others)), 1e-12)
    ranked = sorted(shifts, key=lambda s: -s.score)
    suspects = [s for s in ranked if s.score > cfg.min_score]
    if not suspects:
        return Proposal(False, ranked[0].cls, ranked[0].score, ranked[1].score, shifts)
    examined = []
    for suspect in suspects:  # every class above the threshold, best first: a decoy cannot hide the target
        runner_up = ranked[ranked.index(suspect) + 1].score if suspect is not ranked[-1] else 0.0
        p = Proposal(True, suspect.cls, suspect.score, runner_up, shifts, examined=[s.cls for s in suspects])
        examined.append(_estimate_and_check(p, stats, clean_features, clean_predicted, tail, layer, head_sha256,
                                            clean_labels, cfg))  # fmt: skip
    passing = [p for p in examined if p.deployable]
    if len(passing) > 1:  # repair them all, or none: a repaired decoy must not leave the real target open
        return _combined(passing, stats, clean_features, clean_predicted, clean_labels, tail, layer, head_sha256, cfg)
    return passing[0] if passing else examined[0]


def _effects(p: Proposal, repair, stats, held: dict[int, tuple[np.ndarray, np.ndarray]], clean_features,
             clean_predicted, clean_labels, tail, shape, cfg: TrafficConfig) -> None:  # fmt: skip
    """Fill ``p``'s checks for ``repair`` (one class's direction, or several combined): the held-out
    flagged samples of every repaired class leave it, all other traffic keeps its prediction, the
    clean images keep their accuracy. ``held``: class -> (flagged, unflagged) held-out samples."""
    leave = [(tail(repair(f.reshape(-1, *shape))) != c).mean() for c, (f, _) in held.items()]
    p.leave_rate = float(min(leave))
    others = [stats.samples(k) for k in range(stats.num_classes) if k not in held and stats.counts[k]]
    others += [u for _, u in held.values()]
    other = np.concatenate([o for o in others if len(o)]).reshape(-1, *shape)
    p.other_change = float((tail(repair(other)) != tail(other)).mean())
    after_clean = tail(repair(clean_features.copy()))
    if clean_labels is not None:
        p.ca_drop = 100 * float((clean_predicted == clean_labels).mean() - (after_clean == clean_labels).mean())
    else:
        p.ca_drop = 100 * float((after_clean != clean_predicted).mean())
    p.checks = {
        f"flagged leave the class (>= {cfg.min_leave:.0%})": p.leave_rate >= cfg.min_leave,
        f"other traffic keeps its prediction (<= {cfg.max_other_change:.0%} change)": p.other_change
        <= cfg.max_other_change,
        f"clean accuracy cost <= {cfg.max_ca_drop} points": p.ca_drop <= cfg.max_ca_drop,
    }


def _estimate_and_check(p: Proposal, stats, clean_features, clean_predicted, tail, layer, head_sha256,
                        clean_labels, cfg: TrafficConfig) -> Proposal:  # fmt: skip
    rng = np.random.default_rng(cfg.seed)
    c = p.target
    x = stats.samples(c)
    clean_flat = clean_features.reshape(len(clean_features), -1)
    reference_mean = clean_flat[clean_predicted == c].mean(0)
    shift = x.mean(0) - reference_mean
    along = (x - reference_mean) @ (shift / (np.linalg.norm(shift) + 1e-12))
    labels = _two_means(along[:, None], cfg.restarts, rng)
    flagged = labels == int(np.argmax([along[labels == k].mean() if (labels == k).any() else -np.inf for k in (0, 1)]))
    p.flagged_share = float(flagged.mean())
    if p.flagged_share < cfg.min_cluster_share:
        p.checks = {f"flagged cluster >= {cfg.min_cluster_share:.0%} of the class": False}
        return p
    order = rng.permutation(len(x))
    fit, held = order[: len(x) // 2], order[len(x) // 2 :]
    shape = tuple(clean_features.shape[1:])

    # the flagged samples are images the attacker stamped, of whatever classes: beta is their mean minus
    # the clean mean, the defender's prior over sources. With two classes that mean is half the target
    # class itself and would cancel half of a flipped image's shift: the other class's mean stands in.
    others = clean_flat[clean_predicted != c]
    source_mean = (others if stats.num_classes == 2 and len(others) else clean_flat).mean(0)

    def direction(rows: np.ndarray) -> DirectionFile:
        beta = x[rows][flagged[rows]].mean(0) - source_mean
        return make_directions(beta.reshape(shape), clean_features, layer=layer, mode="project",
                               estimator="traffic", head_sha256=head_sha256, n_poisoned=int(flagged[rows].sum()),
                               extra={"traffic": {"target": c, "score": p.score, "samples": stats.total}})  # fmt: skip

    if flagged[fit].sum() < 2 or flagged[held].sum() < 1:
        p.checks = {"enough flagged samples": False}
        return p
    p.fit_directions = direction(fit)
    p.held = {c: (x[held][flagged[held]], x[held][~flagged[held]])}
    _effects(p, NumpyRepair(p.fit_directions), stats, p.held, clean_features, clean_predicted, clean_labels, tail,
             shape, cfg)  # fmt: skip
    p.directions = direction(np.arange(len(x)))  # the deployed estimate uses every recorded sample
    share = stats.counts[c] / max(stats.total, 1)  # of all samples seen (the reservoir is a sample of them)
    p.traffic_changed = float(share * p.flagged_share)
    return p


def _basis(files: list[DirectionFile]) -> np.ndarray:
    """Orthonormal rows spanning the files' betas, the first one's first."""
    q, _ = np.linalg.qr(np.stack([np.asarray(d.beta, np.float64).reshape(-1) for d in files]).T)
    q = q.T * np.sign(q.T @ np.asarray(files[0].beta, np.float64).reshape(-1))[:, None]
    return q.astype(np.float32)


def _combined(passing: list[Proposal], stats, clean_features, clean_predicted, clean_labels, tail, layer, head_sha256,
              cfg: TrafficConfig) -> Proposal:  # fmt: skip
    """One rank-k project repair for every class whose own direction passed, checked as a whole."""
    first = passing[0]
    shape = tuple(clean_features.shape[1:])
    targets = [p.target for p in passing]

    provenance = {"traffic": {"targets": targets, "score": first.score, "samples": stats.total}}

    # the repair is gated on the first class's direction: if another class's flagged samples do not lie past
    # the clean mean along it, it must repair every sample (calibration.estimators.gate_holds)
    flagged = [q.held[q.target][0] for q in passing]

    def combine(files: list[DirectionFile]) -> DirectionFile:
        basis = _basis(files).reshape(len(files), *shape)
        d = make_directions(files[0].beta, clean_features, layer=layer, mode="project", estimator="traffic",
                            head_sha256=head_sha256, n_poisoned=sum(d.n_poisoned for d in files), basis=basis,
                            extra=provenance)  # fmt: skip
        d.project_gate = gate_holds(d.gate_row(), d.mu, flagged)
        return d

    p = Proposal(True, first.target, first.score, first.next_score, first.classes, examined=first.examined,
                 flagged_share=first.flagged_share, targets=targets)  # fmt: skip
    held = {c: h for q in passing for c, h in q.held.items()}
    _effects(p, NumpyRepair(combine([q.fit_directions for q in passing])), stats, held, clean_features,
             clean_predicted, clean_labels, tail, shape, cfg)  # fmt: skip
    p.directions = combine([q.directions for q in passing])
    p.traffic_changed = float(sum(q.traffic_changed for q in passing))
    return p
