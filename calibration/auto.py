"""``fire calibrate --auto``: choose layer, mode, alpha and rank from the calibration samples alone.

The defender has a few triggered images with their clean originals (paired, true labels known) and
clean images of their own. Nothing from the test split is looked at. For every candidate layer and
setting, K-fold cross-validation over the triggered pairs fits the directions on K-1 folds and
measures, on the held-out fold, PA (triggered images back to their true label), ASR, and agreement
(the repaired triggered image gets the label the model gives its clean original); the clean images
are split in half, one half to fit mu and the gated threshold, the other to measure the clean
accuracy the repair costs. Among the settings whose CA drop stays within the bound, the winner has
the highest held-out PA + agreement (two estimates of the same thing, averaged: with 50 samples one
sample is 2 points and PA alone ties often); remaining ties go to lower ASR, lower CA drop, then the
simpler setting (rank 1, alpha near 1).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from calibration.augment import trigger_centre, views, zooms
from calibration.calibrate import zoo_calibration_set
from calibration.factory import FitInputs, fit_directions
from calibration.inprocess import SplitRunner
from fire_backend.directions import DirectionFile
from fire_backend.errors import InvalidInputError
from fire_backend.names import DEFAULT_AUGMENT, DIRECTIONS_FILE
from fire_backend.repair import Repair
from modelio.export import export_split
from modelio.split import SplitError, candidate_layers, split_at
from zoo.attacks import attack_from_spec
from zoo.checkpoint import load_model


@dataclass
class AutoConfig:
    layers: tuple[str, ...] = ()  # empty: every top-level child a single-tensor cut is possible after
    modes: tuple[str, ...] = ("subtract", "project", "gated")
    # none below 1: such a repair leaves part of the trigger's component, which the attacker brings back by
    # strengthening the trigger (the cut search, ``cutsearch.ALPHAS``, starts at 1 too)
    alphas: tuple[float, ...] = (1.0, 2.0)
    ranks: tuple[int, ...] = (1, 2)  # tried with mode project (with spatial views: one per view)
    augment: str = DEFAULT_AUGMENT  # spatial views of the pairs the directions are fitted on (calibration.augment)
    folds: int = 5
    max_ca_drop: float = 0.5  # percentage points, on the held-out clean half
    fpr: float = 0.01


@dataclass(frozen=True)
class Setting:
    layer: str
    mode: str
    alpha: float
    rank: int = 1


@dataclass
class Scored:
    setting: Setting
    pa: float  # held-out, percent
    asr: float
    ca_drop: float
    agreement: float

    def row(self) -> dict:
        return {
            **asdict(self.setting),
            "PA": self.pa,
            "ASR": self.asr,
            "CA_drop": self.ca_drop,
            "agreement": self.agreement,
        }


@dataclass
class AutoResult:
    best: Scored
    scores: list[Scored]
    feasible: bool  # False: no setting met the CA bound; ``best`` is the one with the smallest CA drop
    directions: DirectionFile = field(repr=False)


def usable_layers(model: nn.Module) -> list[str]:
    out = []
    for name in candidate_layers(model):
        try:
            split_at(model, name)
        except SplitError:
            continue
        if any(p.numel() for p in getattr(model, name).parameters()):  # skip normalize / pool / flatten
            out.append(name)
    return out


def settings_for(layer: str, config: AutoConfig) -> list[Setting]:
    out = []
    ranks = config.ranks if config.augment == "none" else (len(views(config.augment)),)
    for mode in config.modes:
        for alpha in config.alphas:
            for rank in ranks if mode == "project" else (1,):
                out.append(Setting(layer, mode, alpha, rank))
    return out


def _pick(scores: list[Scored], max_ca_drop: float) -> tuple[Scored, bool]:
    feasible = [s for s in scores if s.ca_drop <= max_ca_drop + 1e-9]
    if not feasible:
        return min(scores, key=lambda s: (s.ca_drop, -s.pa)), False
    simpler = lambda s: (-s.setting.rank, -abs(s.setting.alpha - 1))  # noqa: E731
    return max(feasible, key=lambda s: (s.pa + s.agreement, -s.asr, -s.ca_drop, *simpler(s))), True


def auto_calibrate(
    model: nn.Module,
    pair_clean: np.ndarray,
    pair_poisoned: np.ndarray,
    pair_labels: np.ndarray,
    pair_wanted: np.ndarray,
    clean: np.ndarray,
    clean_labels: np.ndarray,
    config: AutoConfig | None = None,
    seed: int = 0,
) -> AutoResult:
    """Search layers x settings on calibration data; returns the scores and the winner's directions
    (fitted on all the calibration samples). ``pair_wanted``: the attacker's labels for the pairs."""
    config = config or AutoConfig()
    n = len(pair_poisoned)
    if n < 2:
        raise InvalidInputError(f"auto-calibration needs at least 2 triggered samples, got {n}")
    folds = min(config.folds, n)
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(n) % folds
    half = rng.permutation(len(clean))
    fit_clean, held_clean = half[: len(clean) // 2], half[len(clean) // 2 :]
    layers = list(config.layers) or usable_layers(model)
    centre = trigger_centre(pair_poisoned, pair_clean, True) if zooms(config.augment) else None
    scores: list[Scored] = []
    runners: dict[str, tuple[SplitRunner, FitInputs]] = {}
    for layer in tqdm(layers, desc="auto-calibrate", unit="layer", disable=None):
        runner = SplitRunner(model, layer)
        fc, fp, fk = runner.features(pair_clean), runner.features(pair_poisoned), runner.features(clean)
        vs = views(config.augment, centre)  # fitted on every view of the pairs, judged on the pairs as they are
        fc_v = torch.cat([runner.features(v(pair_clean)) for v in vs])
        fp_v = torch.cat([runner.features(v(pair_poisoned)) for v in vs])
        fold_v = np.tile(fold_of, len(vs))
        runners[layer] = (runner, FitInputs(fc_v, fp_v, fk[fit_clean], len(vs)))
        held_k = fk[held_clean]
        base_k = runner.labels(held_k)
        base_acc = 100 * float((base_k == clean_labels[held_clean]).mean())
        base_p, original = runner.labels(fp), runner.labels(fc)
        sums = {s: np.zeros(4) for s in settings_for(layer, config)}
        for k in range(folds):
            held = fold_of == k
            fit_v = torch.from_numpy(fold_v != k)
            inputs = FitInputs(fc_v[fit_v], fp_v[fit_v], fk[fit_clean], len(vs))
            cache: dict[tuple[str, int], DirectionFile] = {}
            for s in sums:
                key = (s.mode, s.rank)
                if key not in cache:
                    cache[key] = fit_directions(inputs, layer, s.mode, 1.0, s.rank, config.fpr)
                d = cache[key]
                d.alpha = s.alpha
                edit = Repair(d)
                pred_p = runner.labels_after(fp[torch.from_numpy(held)], base_p[held], edit)
                pred_k = runner.labels_after(held_k, base_k, edit)
                acc = 100 * float((pred_k == clean_labels[held_clean]).mean())
                sums[s] += (
                    100 * float((pred_p == pair_labels[held]).sum()),
                    100 * float((pred_p == pair_wanted[held]).sum()),
                    (base_acc - acc) / folds,
                    100 * float((pred_p == original[held]).sum()),
                )
        scores += [Scored(s, v[0] / n, v[1] / n, v[2], v[3] / n) for s, v in sums.items()]
    best, feasible = _pick(scores, config.max_ca_drop)
    runner, inputs = runners[best.setting.layer]
    s = best.setting
    directions = fit_directions(inputs, s.layer, s.mode, s.alpha, s.rank, config.fpr)
    directions.n_clean = len(fit_clean)
    directions.extra = {"auto": {"config": asdict(config), "best": best.row(), "feasible": feasible}}
    return AutoResult(best, scores, feasible, directions)


def auto_calibrate_model(
    model_dir: str | Path,
    export_dir: str | Path,
    n_poisoned: int = 50,
    n_clean: int = 1000,
    config: AutoConfig | None = None,
    attack: dict | None = None,
    seed: int = 0,
) -> tuple[AutoResult, Path]:
    """The whole ``fire calibrate --auto`` step: search on calibration samples from the training split,
    export the model split at the chosen layer to ``export_dir``, write the direction file there
    (bound to the exported head) and the search's scores as ``auto_calibration.csv``."""
    model, meta = load_model(model_dir)
    atk = attack_from_spec(attack or meta["attack"])
    pool = zoo_calibration_set(meta["dataset"], atk, n_poisoned, n_clean, seed)
    result = auto_calibrate(
        model,
        pool.originals,
        pool.triggered,
        pool.original_labels,
        atk.target_labels(pool.original_labels, pool.num_classes),
        pool.clean,
        pool.clean_labels,
        config,
        seed,
    )
    info = export_split(model_dir, result.best.setting.layer, export_dir)
    d = result.directions
    d.head_sha256 = info.head_sha256
    d.extra = {**d.extra, "attack": atk.spec(), "dataset": meta["dataset"], "seed": seed}
    out = Path(export_dir)
    d.save(out / DIRECTIONS_FILE)
    with (out / "auto_calibration.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(result.scores[0].row()))
        w.writeheader()
        w.writerows(s.row() for s in sorted(result.scores, key=lambda s: -s.pa))
    return result, out / DIRECTIONS_FILE
