"""Choose where to cut a user's model from the calibration images alone (``fire protect --auto``).

For every candidate cut and repair strength (``ALPHAS``), the direction (with the calibration's
spatial views, ``calibration.augment``) is fitted on one half of the
calibration images (project mode, the default repair; unpaired against the clean images the model does
not put in the triggered images' class, ``estimators.unpaired_reference``) and judged on the other half,
without labels where there are none:
- cost: the share of held-out clean images whose prediction the repair changes (with labels: the
  clean-accuracy drop); a cut whose cost exceeds ``max_ca_drop`` points is not taken;
- gain: the share of held-out triggered images the repair moves off their current prediction; with
  paired images and labels, the share given back their true label (PA);
- transfer: the same gain for a direction fitted on the images as they are (no views) and judged on the
  held-out triggered images moved by each view (mirrored, shifted): whether the trigger moves the
  features the same way wherever it sits. A cut where it does is one where the variants an attacker will
  try share a direction; one where it does not repairs the calibrated placement only.
The (cut, strength) with the highest gain within the cost bound wins; ties (common: with 25 held-out
images one image is 4 points) go to the higher transfer, then lower cost, then the weaker repair. Works
for an ONNX model
(tensors, ``OnnxRunner``) and a torch module (sub-modules, ``calibration.inprocess.SplitRunner``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from calibration.augment import spatial_estimate, views
from calibration.calibrate import CalibrationSet
from calibration.estimators import unpaired_reference
from fire_backend.errors import InvalidInputError
from fire_backend.names import FEATURES
from fire_backend.onnx_runtime import onnx_session
from fire_backend.repair import Repair
from modelio.onnx_graph import OnnxGraph
from modelio.preprocess import Preprocess


class OnnxRunner:
    """An ONNX model cut at one tensor, run with onnxruntime: ``features(images)``, ``labels(features)``."""

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

    def labels(self, features: torch.Tensor, edit=None) -> np.ndarray:
        out = []
        for i in range(0, len(features), self.batch_size):
            f = features[i : i + self.batch_size]
            f = (edit(f) if edit else f).numpy()
            out.append(self.tail.run(None, {FEATURES: f})[0].reshape(len(f), -1).argmax(1))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


ALPHAS = (1.0, 1.5, 2.0)  # repair strengths tried with every cut (1: remove the estimated component)
TRANSFER_VIEWS = "flips-shifts"  # the moves the transfer score judges on (calibration.augment), whatever the fit uses


@dataclass
class CutScore:
    cut: str
    feature_shape: tuple
    gain: float  # percent of held-out triggered images moved (or given back their label)
    cost: float  # percent of held-out clean images changed (or CA drop, points)
    gain_kind: str
    cost_kind: str
    alpha: float = 1.0
    repaired: np.ndarray | None = field(default=None, repr=False)  # held-out triggered images' labels after it
    unrepaired: np.ndarray | None = field(default=None, repr=False)  # and before any repair
    transfer: float = 0.0  # the gain of a view-less direction on the held-out images moved (module docstring)


def _halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def score_cut(runner, data: CalibrationSet, seed: int = 0, alphas: tuple[float, ...] = (1.0,),
              augment: str = "none") -> list[CutScore]:  # fmt: skip
    """Fit on one half of the calibration images, judge on the other (see the module docstring): one score
    per strength in ``alphas``."""
    name = getattr(runner, "cut", None) or runner.layer
    fit_c, held_c = _halves(len(data.clean), seed)
    fit_t, held_t = _halves(len(data.triggered), seed + 1)
    clean, trig = runner.features(data.clean), runner.features(data.triggered)
    feats = lambda x: runner.features(x).numpy()  # noqa: E731
    if data.paired:
        other = data.originals[fit_t]
    else:
        ref, _ = unpaired_reference(runner.labels(clean[fit_c]), runner.labels(trig[fit_t]))
        other = data.clean[fit_c][ref]
    est = spatial_estimate(feats, data.triggered[fit_t], other, data.paired, augment)
    one_view = spatial_estimate(feats, data.triggered[fit_t], other, data.paired, "none")
    moved = [runner.features(view(data.triggered[held_t])) for view in views(TRANSFER_VIEWS)[1:]]
    moved_base = [runner.labels(f) for f in moved]
    base_c, base_t = runner.labels(clean[held_c]), runner.labels(trig[held_t])
    labels = data.original_labels[held_t] if data.paired and data.original_labels is not None else None

    def gain_of(after: np.ndarray, before: np.ndarray) -> float:
        return 100 * float((after == labels).mean() if labels is not None else (after != before).mean())

    scores = []
    for alpha in alphas:
        repair = Repair(est.directions(clean[fit_c], layer=name, mode="project", alpha=alpha))
        after_c, after_t = runner.labels(clean[held_c], repair), runner.labels(trig[held_t], repair)
        if data.clean_labels is not None:
            y = data.clean_labels[held_c]
            cost, cost_kind = 100 * float((base_c == y).mean() - (after_c == y).mean()), "CA drop"
        else:
            cost, cost_kind = 100 * float((after_c != base_c).mean()), "clean predictions changed"
        gain_kind = "PA" if labels is not None else "triggered predictions moved"
        one = Repair(one_view.directions(clean[fit_c], layer=name, mode="project", alpha=alpha))
        transfer = [gain_of(runner.labels(f, one), b) for f, b in zip(moved, moved_base, strict=True)]
        scores.append(CutScore(name, tuple(clean.shape[1:]), gain_of(after_t, base_t), cost, gain_kind, cost_kind,
                               alpha, after_t, base_t, float(np.mean(transfer))))  # fmt: skip
    return scores


def choose_cut(
    runner_for: Callable[[str], object],
    cuts: list[str],
    data: CalibrationSet,
    max_ca_drop: float = 0.5,
    seed: int = 0,
    alphas: tuple[float, ...] = ALPHAS,
    augment: str = "none",
) -> tuple[CutScore, list[CutScore]]:
    """The best (cut, strength) among ``cuts`` x ``alphas`` (see the module docstring) and every score."""
    if not cuts:
        raise InvalidInputError("no candidate cuts")
    if len(data.triggered) < 4 or len(data.clean) < 4:
        raise InvalidInputError("choosing a cut needs at least 4 clean and 4 triggered calibration images")
    progress = tqdm(cuts, desc="cuts", unit="cut", disable=None)
    scores = [s for c in progress for s in score_cut(runner_for(c), data, seed, alphas, augment)]
    within = [s for s in scores if s.cost <= max_ca_drop + 1e-9] or [min(scores, key=lambda s: s.cost)]
    if scores[0].gain_kind != "PA":  # no true labels: judge the moves by whether the candidates agree on them
        scores = _agreement(scores, within)
        within = [s for s in scores if s.cost <= max_ca_drop + 1e-9] or [min(scores, key=lambda s: s.cost)]
    return max(within, key=preference), scores


def preference(s: CutScore) -> tuple[float, float, float, float]:
    """How ``choose_cut`` orders the candidates within the cost bound: gain, transfer, lower cost, weaker."""
    return s.gain, s.transfer, -s.cost, -s.alpha


def _agreement(scores: list[CutScore], within: list[CutScore]) -> list[CutScore]:
    """Without the triggered images' true labels, "moved off the prediction" cannot tell a restored label
    from a wrong one, and most candidates move nearly all of them. Restored labels agree across repairs,
    wrong ones scatter: each held-out triggered image's consensus is the most common label the admissible
    candidates move it to; a candidate's gain is the share of images it moves to their consensus."""
    moved, before = np.stack([s.repaired for s in within]), scores[0].unrepaired
    consensus = np.full(moved.shape[1], -1)
    for i in range(moved.shape[1]):
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
