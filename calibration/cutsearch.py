"""Choose where to cut a user's model from the calibration images alone (``fire protect --auto``).

For every candidate cut and repair strength (``ALPHAS``), the direction (with the calibration's
spatial views, ``calibration.augment``; project mode, the default repair; unpaired against the clean
images the model does not put in the triggered images' class, ``estimators.unpaired_reference``) is
cross-fitted: the clean and the triggered images are each split into (up to) ``FOLDS`` folds, and
every fold is judged by a direction fitted on the other folds, so every calibration image is judged
once, by a direction from four fifths of them (a single half split judged 25 of 50 triggered images
with directions from 25, noisier than the deployed file from all 50). Judged without labels where there are
none:
- cost: the share of held-out clean images whose prediction the repair changes (with labels: the
  clean-accuracy drop), or the drop in their expected accuracy (the mean probability the model gives
  that label) when it is larger (``accuracy_drop``: on images the model was trained on, an argmax count
  misses a cost that unseen images pay); a cut whose cost exceeds ``max_ca_drop`` points is not taken;
- gain: the share of held-out triggered images the repair moves off their current prediction; with
  paired images and labels, the share given back their true label (PA);
- transfer: the share of held-out triggered images moved by each view (mirrored, shifted, zoomed) that a
  direction fitted on the images as they are (no views, strength 1) gives back their label (or moves):
  whether the trigger moves the features the same way wherever it sits. A cut where it does is one
  where the variants an attacker will try share a direction; one where it does not repairs the
  calibrated placement only. A property of the cut, the same for each of its strengths: judged per
  strength, a view-less direction's overshoot reaches moved images that the deployed repair covers with
  its views anyway, and the tie-break rewarded the overshoot (GTSRB 12x12 at ``layer2.0``: equal gain,
  transfer 57 at strength 1 and 69 at 2; strength 2 costs the scaled triggers 1-2 points of ASR).
The (cut, strength) with the highest gain within the cost bound wins; ties (common: with 50 triggered
images one image is 2 points) go to the weaker repair, then the higher transfer, then the lower cost.
The weaker first: a strength past 1 pushes the features beyond the estimated clean point, and on the
calibration pairs (training images the model is sure of) that overshoot shows no cost, while on images
the model has not seen it gives back fewer labels (``results/adaptive_cuts.md``, five models: the mean
test PA over the variants is lower at the stronger of two strengths of one cut in 94 of 120 pairs, and
in 13 of the 15 whose calibration gains are equal). A stronger repair is taken when it gains. Works
for an ONNX model (tensors, ``OnnxRunner``) and a torch module (sub-modules,
``calibration.inprocess.SplitRunner``).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from calibration.augment import estimate_from_views, trigger_centre, views, without_zooms, zooms
from calibration.calibrate import CalibrationSet
from calibration.estimators import reference_too_small, unpaired_reference
from fire_backend.errors import InvalidInputError
from fire_backend.names import DEFAULT_AUGMENT, FEATURES
from fire_backend.onnx_runtime import onnx_session
from fire_backend.repair import Repair
from modelio.onnx_graph import OnnxGraph
from modelio.preprocess import Preprocess


class OnnxRunner:
    """An ONNX model cut at one tensor, run with onnxruntime: ``features(images)``, ``outputs(features)``
    and ``labels(features)``."""

    def __init__(self, graph: OnnxGraph, cut: str, preprocess: Preprocess, batch_size: int = 256):
        self.cut, self.preprocess, self.batch_size = cut, preprocess, batch_size
        with tempfile.TemporaryDirectory(prefix="fire-cut-") as tmp:
            head, tail = graph.split(cut, tmp)
            self.head, self.tail = onnx_session(head, threads=2), onnx_session(tail, threads=2)
        self.input_name = graph.input.name

    def features(self, images: np.ndarray) -> torch.Tensor:
        out = [
            self.head.run([FEATURES], {self.input_name: self.preprocess.apply(images[i : i + self.batch_size])})[0]
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.from_numpy(np.concatenate(out))

    def outputs(self, features: torch.Tensor, edit=None) -> np.ndarray:
        """The model's outputs (N, classes) from features, repaired by ``edit`` first when given."""
        out = []
        for i in range(0, len(features), self.batch_size):
            f = features[i : i + self.batch_size]
            f = (edit(f) if edit else f).numpy()
            out.append(self.tail.run(None, {FEATURES: f})[0].reshape(len(f), -1))
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    def labels(self, features: torch.Tensor, edit=None) -> np.ndarray:
        return self.outputs(features, edit).argmax(1) if len(features) else np.zeros(0, dtype=np.int64)


ALPHAS = (1.0, 1.5, 2.0)  # repair strengths tried with every cut (1: remove the estimated component)
TRANSFER_VIEWS = DEFAULT_AUGMENT  # the moves the transfer score judges on (calibration.augment), whatever the fit uses
FOLDS = 5  # cross-fitting: each fifth of the images judged by a direction fitted on the other four
WEAK_GAIN = 90.0  # percent: a chosen repair that gains less is reported (``shortfall``) ...
STRONGER_BY = 10.0  # ... when one past the cost bound gains at least this many points more (5 of 50 images)
HELD_BACK_MAX_COST = 10.0  # points: ... and costs at most this (a bound past it is no repair worth offering)


@dataclass
class CutScore:
    cut: str
    feature_shape: tuple
    gain: float  # percent of held-out triggered images moved (or given back their label)
    cost: float  # points: held-out clean images changed, or CA drop (``accuracy_drop``)
    gain_kind: str
    cost_kind: str
    alpha: float = 1.0
    repaired: np.ndarray | None = field(default=None, repr=False)  # held-out triggered images' labels after it
    unrepaired: np.ndarray | None = field(default=None, repr=False)  # and before any repair
    transfer: float = 0.0  # the gain of a view-less direction on the held-out images moved (module docstring)
    augment: str = "none"  # the views the direction was fitted on (calibration.augment)


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint held-out index sets covering ``range(n)``."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(order[i::k]) for i in range(k)]


class _ReferenceMeans:
    """Unpaired: each view's mean clean feature over the reference images outside one fold, or over every
    clean image outside it when too few of the reference are (``estimators.unpaired_reference``'s rule),
    from per-fold sums (the clean images' features are computed once per view, ``chunk`` at a time)."""

    def __init__(self, features, clean: np.ndarray, reference: np.ndarray, folds: list[np.ndarray], view_list: list,
                 chunk: int = 256):  # fmt: skip
        group = np.zeros(len(clean), dtype=np.int64)  # 2 * fold + (1 if in the reference)
        for j, f in enumerate(folds):
            group[f] = 2 * j + reference[f]
        self.counts = np.bincount(group, minlength=2 * len(folds)).reshape(-1, 2).astype(np.float64)
        self.sums = []  # per view: (folds, 2, D)
        for view in view_list:
            sums = 0.0
            for i in range(0, len(clean), chunk):
                x = np.asarray(features(view(clean[i : i + chunk])), np.float64)
                self.shape = x.shape[1:]
                x, g = x.reshape(len(x), -1), group[i : i + chunk]
                sums = sums + np.stack([x[g == j].sum(0) for j in range(2 * len(folds))])
            self.sums.append(sums.reshape(len(folds), 2, -1))

    def outside(self, fold: int) -> list[np.ndarray]:
        rest = np.arange(len(self.counts)) != fold
        n_ref, n_all = self.counts[rest, 1].sum(), self.counts[rest].sum()
        use_all = reference_too_small(n_ref, n_all)
        means = [s[rest].sum((0, 1)) / n_all if use_all else s[rest, 1].sum(0) / n_ref for s in self.sums]
        return [m.reshape(1, *self.shape) for m in means]


def score_cut(runner, data: CalibrationSet, seed: int = 0, alphas: tuple[float, ...] = (1.0,),
              augment: str = "none", folds: int = FOLDS) -> list[CutScore]:  # fmt: skip
    """Cross-fitted (see the module docstring): each of up to ``folds`` folds of the clean and the
    triggered images (fewer when there are fewer than 2 * ``folds`` of either) is judged by a direction
    fitted on the others, so every image is judged once. One score per strength in ``alphas`` and view set:
    ``augment``'s, and when it zooms, its views less the zooms too (``choose_cut`` takes the wider where
    its cost allows)."""
    name = getattr(runner, "cut", None) or runner.layer
    k = max(2, min(folds, len(data.triggered) // 2, len(data.clean) // 2))
    held_c, held_t = _folds(len(data.clean), k, seed), _folds(len(data.triggered), k, seed + 1)
    feats = lambda x: runner.features(x).numpy()  # noqa: E731
    clean, trig = runner.features(data.clean), runner.features(data.triggered)
    outputs = runner.outputs(clean)
    kind = output_kind(outputs)  # once, so every fold's outputs are read the same way
    p_c = probabilities(outputs, kind)
    base_c, base_t = p_c.argmax(1), runner.labels(trig)
    reference = _class_indices(data.clean_labels, p_c.shape[1]) if data.clean_labels is not None else base_c
    labels = None  # the triggered images' true labels, when paired with them
    if data.paired and data.original_labels is not None:
        labels = _class_indices(data.original_labels, p_c.shape[1])
    # unpaired: one reference for every fold, from the unrepaired predictions (no fold's repair enters it);
    # the zooms' centre from it, as the deployed file's (``calibrate``)
    mask = None if data.paired else unpaired_reference(base_c, base_t)[0]
    other = data.originals if data.paired else data.clean[mask]
    fit = views(augment, trigger_centre(data.triggered, other, data.paired) if zooms(augment) else None)
    t_views = [trig.numpy()] + [feats(view(data.triggered)) for view in fit[1:]]  # once per cut; folds take rows
    if data.paired:
        o_views = [feats(view(data.originals)) for view in fit]
    else:
        means = _ReferenceMeans(feats, data.clean, mask, held_c, fit)
    if augment == TRANSFER_VIEWS:  # the transfer score's moved images are the fit's other views
        moved = [torch.from_numpy(t) for t in t_views[1:]]
    else:
        centre = trigger_centre(data.triggered, other, data.paired)
        moved = [runner.features(view(data.triggered)) for view in views(TRANSFER_VIEWS, centre)[1:]]
    moved_base = [runner.labels(f) for f in moved]
    before_c = judged(p_c, reference)
    view_sets = [augment] + ([without_zooms(augment)] if zooms(augment) else [])  # the widest first
    tried = [(v, a) for v in view_sets for a in alphas]
    after_c = {k: tuple(x.copy() for x in before_c) for k in tried}  # what the cost needs, per setting
    after_t = {k: base_t.copy() for k in tried}
    after_moved = [b.copy() for b in moved_base]  # the transfer score: strength 1, a property of the cut
    for j, (hc, ht) in enumerate(zip(held_c, held_t, strict=True)):
        fit_c = np.setdiff1d(np.arange(len(clean)), hc)
        fit_t = np.setdiff1d(np.arange(len(trig)), ht)
        fit_views = [t[fit_t] for t in t_views]
        others = [o[fit_t] for o in o_views] if data.paired else means.outside(j)
        fits = {v: estimate_from_views(fit_views[: len(views(v))], others[: len(views(v))], data.paired)
                for v in view_sets}  # a narrower set's views are a prefix of the wider's  # fmt: skip
        one_view = estimate_from_views(fit_views[:1], others[:1], data.paired)  # the identity view is first
        fit_clean = clean[fit_c]
        settings = {"layer": name, "mode": "project", "mu": fit_clean.double().mean(0).float()}  # once a fold
        one = Repair(one_view.directions(fit_clean, **settings))
        for f, out in zip(moved, after_moved, strict=True):
            out[ht] = runner.labels(f[ht], one)
        for v, a in tried:
            repair = Repair(fits[v].directions(fit_clean, alpha=a, **settings))
            pred, p_ref = judged(probabilities(runner.outputs(clean[hc], repair), kind), reference[hc])
            after_c[v, a][0][hc], after_c[v, a][1][hc] = pred, p_ref
            after_t[v, a][ht] = runner.labels(trig[ht], repair)

    def moved_off(after: np.ndarray, before: np.ndarray) -> float:
        return 100 * float((after == labels).mean() if labels is not None else (after != before).mean())

    transfer = float(np.mean([moved_off(m, b) for m, b in zip(after_moved, moved_base, strict=True)]))
    scores = []
    for v, a in tried:
        scores.append(CutScore(name, tuple(clean.shape[1:]), moved_off(after_t[v, a], base_t),
                               accuracy_drop(before_c, after_c[v, a], reference),
                               "PA" if labels is not None else "triggered predictions moved",
                               "CA drop, argmax or expected" if data.clean_labels is not None
                               else "clean predictions changed, or confidence lost",
                               a, after_t[v, a], base_t, transfer, v))  # fmt: skip
    return scores


def output_kind(outputs: np.ndarray) -> str:
    """``"probabilities"`` when every row of a model's outputs (N, classes) is non-negative (to 1e-6) and
    sums to 1 (to 1e-3): a model that ends in a softmax; else "logits" (logits or log-probabilities,
    whose softmax is the probabilities). Decided once per model, on its unrepaired outputs."""
    out = _rows(outputs)
    return "probabilities" if (out >= -1e-6).all() and np.allclose(out.sum(1), 1.0, atol=1e-3) else "logits"


def probabilities(outputs: np.ndarray, kind: str) -> np.ndarray:
    """A model's outputs (N, classes) as class probabilities, read as ``output_kind`` said."""
    out = _rows(outputs)
    if not out.size:
        return out
    if kind == "probabilities":
        out = np.clip(out, 0.0, None)
        return out / np.maximum(out.sum(1, keepdims=True), 1e-12)
    e = np.exp(out - out.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _rows(outputs: np.ndarray) -> np.ndarray:
    out = np.asarray(outputs, np.float64)
    out = out.reshape(out.shape[0], int(np.prod(out.shape[1:])))
    if not np.isfinite(out).all():
        raise InvalidInputError("the model's outputs contain NaN or Inf: the cut search cannot judge a repair")
    return out


def _class_indices(labels: np.ndarray, classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise InvalidInputError(f"labels must be class indices 0..{classes - 1} (the model has {classes} outputs); "
                                f"got {labels.min()}..{labels.max()}")  # fmt: skip
    return labels.astype(np.int64)


def judged(p: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, probability of ``labels``) per image: all ``accuracy_drop`` needs of (N,
    classes) probabilities."""
    return p.argmax(1), p[np.arange(len(labels)), labels]


def accuracy_drop(before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray],
                  labels: np.ndarray) -> float:  # fmt: skip
    """Points of accuracy on ``labels`` a repair costs (``judged`` pairs ``before`` and ``after`` it): the
    larger of the drop in argmax accuracy and in expected accuracy (the mean probability the model gives
    ``labels``: the accuracy its softmax would have if it drew its answer from it). On images the model
    was trained on it is sure of nearly every answer, and a repair that costs unseen images their label
    first costs these their confidence: the argmax count alone can read 0 there and still cost the test
    split a point."""
    (pred0, p0), (pred1, p1) = before, after
    hard = 100 * float((pred0 == labels).mean() - (pred1 == labels).mean())
    return max(hard, 100 * float(p0.mean() - p1.mean()))


def choose_cut(
    runner_for: Callable[[str], object],
    cuts: list[str],
    data: CalibrationSet,
    max_ca_drop: float = 0.5,
    seed: int = 0,
    alphas: tuple[float, ...] = ALPHAS,
    augment: str = "none",
) -> tuple[CutScore, list[CutScore]]:
    """The best (cut, strength) among ``cuts`` x ``alphas`` (see the module docstring) and the score of each,
    with the views ``widest_affordable`` keeps for it."""
    if not cuts:
        raise InvalidInputError("no candidate cuts")
    if len(data.triggered) < 4 or len(data.clean) < 4:
        raise InvalidInputError("choosing a cut needs at least 4 clean and 4 triggered calibration images")
    progress = tqdm(cuts, desc="cuts", unit="cut", disable=None)
    scores = widest_affordable([s for c in progress for s in score_cut(runner_for(c), data, seed, alphas, augment)],
                               max_ca_drop)  # fmt: skip
    within = [s for s in scores if s.cost <= max_ca_drop + 1e-9] or [min(scores, key=lambda s: s.cost)]
    if scores[0].gain_kind != "PA":  # no true labels: judge the moves by whether the candidates agree on them
        scores = _agreement(scores, within)
        within = [s for s in scores if s.cost <= max_ca_drop + 1e-9] or [min(scores, key=lambda s: s.cost)]
    return max(within, key=preference), scores


def held_back(best: CutScore, scores: list[CutScore], max_ca_drop: float) -> CutScore | None:
    """The candidate the cost bound held back, when the one ``choose_cut`` took repairs fewer than
    ``WEAK_GAIN`` percent of the held-out triggered images and one past the bound repairs ``STRONGER_BY``
    points more, at no more than ``HELD_BACK_MAX_COST`` points: the cheapest of those that reach
    ``WEAK_GAIN``, else the one with the most gain. The bound, not the estimate, is then what holds the
    repair back, and whether the clean accuracy is worth it is the user's call (``shortfall`` says so).
    None otherwise (a repair that only costs tens of points moves the images is no repair: images that
    carry no trigger the model responds to look like that, ``estimators.not_triggered``)."""
    if best.gain >= WEAK_GAIN:
        return None
    stronger = [s for s in scores if max_ca_drop + 1e-9 < s.cost <= HELD_BACK_MAX_COST
                and s.gain >= best.gain + STRONGER_BY]  # fmt: skip
    if not stronger:
        return None
    reaching = [s for s in stronger if s.gain >= WEAK_GAIN]
    if reaching:
        return min(reaching, key=lambda s: (s.cost, -s.gain))
    return max(stronger, key=lambda s: (s.gain, -s.cost))


def admitting_bound(s: CutScore) -> float:
    """The least ``--max-ca-drop`` (in hundredths, rounded up) that admits ``s`` (round first: 1.2 * 100
    may be 120.000...01)."""
    return math.ceil(round(s.cost * 100, 6)) / 100


def shortfall(best: CutScore, scores: list[CutScore], max_ca_drop: float) -> str | None:
    """``held_back``'s candidate as a one-line warning naming the bound that admits it; None without one."""
    s = held_back(best, scores, max_ca_drop)
    if s is None:
        return None
    return (f"the repair chosen within --max-ca-drop {max_ca_drop:g} moves only {best.gain:.0f} % of the held-out "
            f"triggered images ({best.gain_kind}); {s.cut} at alpha {s.alpha:g} moves {s.gain:.0f} % for "
            f"{s.cost:.2f} points: --max-ca-drop {admitting_bound(s):.2f} (or more) admits it")  # fmt: skip


def widest_affordable(scores: list[CutScore], max_ca_drop: float) -> list[CutScore]:
    """One score per (cut, strength): the widest view set (the first ``score_cut`` lists) whose cost is
    within ``max_ca_drop``, else the cheapest. Each view covers a variant an attacker may try, and the
    calibrated trigger's gain tells little of that (a zoom view can cost a held-out image or two of it,
    within the noise of 50), so the wider set is kept wherever it is affordable, whatever its gain: the
    zoom views of a full-image trigger near the input (SIG at ``stem.2``: 0.72 points against 0.48
    without) are what the bound drops, not those of a patch (trojan at ``layer2.0``)."""
    groups: dict[tuple[str, float], list[CutScore]] = {}
    for s in scores:
        groups.setdefault((s.cut, s.alpha), []).append(s)
    bound = max_ca_drop + 1e-9
    return [next((s for s in g if s.cost <= bound), None) or min(g, key=lambda s: s.cost) for g in groups.values()]


def preference(s: CutScore) -> tuple[float, float, float, float]:
    """How ``choose_cut`` orders the candidates within the cost bound: gain, weaker, transfer, lower cost
    (the module docstring says why)."""
    return s.gain, -s.alpha, s.transfer, -s.cost


def _agreement(scores: list[CutScore], within: list[CutScore]) -> list[CutScore]:
    """Without the triggered images' true labels, "moved off the prediction" cannot tell a restored label
    from a wrong one, and most candidates move nearly all of them. Restored labels agree across repairs,
    wrong ones scatter: each held-out triggered image's consensus is the most common label the admissible
    candidates move it to (where none moves it, the label every candidate moves it to most: it changes no
    admissible candidate's gain, and gives those past the cost bound one ``shortfall`` can report); a
    candidate's gain is the share of images it moves to their consensus."""
    before = scores[0].unrepaired
    consensus = np.full(len(before), -1)
    for voters in (within, scores):
        moved = np.stack([s.repaired for s in voters])
        for i in np.flatnonzero(consensus < 0):
            votes = moved[:, i][moved[:, i] != before[i]]
            if len(votes):
                consensus[i] = int(np.bincount(votes).argmax())
    kind = "triggered moved to the candidates' consensus"
    return [replace(s, gain=100 * float((s.repaired == consensus).mean()), gain_kind=kind) for s in scores]


def onnx_runner_for(
    onnx_path: str | Path, preprocess: Preprocess
) -> tuple[Callable[[str], OnnxRunner], list[str], dict[str, str]]:
    """A runner factory over an ONNX model's valid cuts, those cuts (tensor names), and the valid cuts left
    out because their shape is not static at the served size (tensor -> reason)."""
    graph = OnnxGraph(onnx_path, input_dims=(None, *preprocess.dims))  # shapes at the served size
    cuts = [c.tensor for c in graph.cuts()]
    return (lambda cut: OnnxRunner(graph, cut, preprocess)), cuts, dict(graph.skipped)
