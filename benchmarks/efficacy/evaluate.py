"""The defenses and ablations on one model: CSV rows of CA / ASR / PA on the test split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.efficacy.config import EfficacyConfig
from benchmarks.efficacy.plots import plot_features
from benchmarks.efficacy.rows import row
from benchmarks.input_transforms import BASELINES
from calibration.auto import auto_calibrate, usable_layers
from calibration.calibrate import unpaired_beta, zoo_calibration_set
from calibration.estimators import RunningMean, unpaired_direction
from calibration.factory import FitInputs, fit_directions
from calibration.inprocess import ChainRunner, SplitRunner
from fire_backend.repair import Repair
from zoo.attacks import Attack, attack_from_spec
from zoo.checkpoint import load_model
from zoo.data import load_dataset


@dataclass
class EvalSet:
    """The test split as the metrics need it: clean images, and triggered ones with their labels."""

    clean: np.ndarray
    labels: np.ndarray
    triggered: np.ndarray
    true: np.ndarray  # true labels of the triggered images
    wanted: np.ndarray  # the attacker's labels for them

    @classmethod
    def build(cls, dataset: str, attack: Attack, limit: int, seed: int) -> EvalSet:
        test = load_dataset(dataset, "test")
        if limit:
            test = test.subset(limit, seed=seed)
        keep = attack.counts_for_asr(test.labels)
        true = test.labels[keep]
        return cls(
            test.images,
            test.labels,
            attack.apply(test.images[keep]),
            true,
            attack.target_labels(true, test.num_classes),
        )

    def score(self, pred_clean: np.ndarray, pred_triggered: np.ndarray) -> dict[str, float]:
        return {
            "CA": 100 * float((pred_clean == self.labels).mean()),
            "ASR": 100 * float((pred_triggered == self.wanted).mean()),
            "PA": 100 * float((pred_triggered == self.true).mean()),
        }


class LayerCache:
    """Test and calibration features at one layer, and the unrepaired predictions, computed once."""

    def __init__(self, model: torch.nn.Module, layer: str, ev: EvalSet, pairs: tuple[np.ndarray, np.ndarray], clean):
        self.runner = SplitRunner(model, layer)
        self.layer = layer
        self.x, self.t = self.runner.features(ev.clean), self.runner.features(ev.triggered)
        self.base_x, self.base_t = self.runner.labels(self.x), self.runner.labels(self.t)
        self.pair_clean, self.pair_poisoned = self.runner.features(pairs[0]), self.runner.features(pairs[1])
        self.clean = self.runner.features(clean)

    def inputs(self, n: int | None = None, idx: np.ndarray | None = None) -> FitInputs:
        sel = torch.from_numpy(idx) if idx is not None else slice(0, n)
        return FitInputs(self.pair_clean[sel], self.pair_poisoned[sel], self.clean)

    def evaluate(self, ev: EvalSet, repair: Repair) -> dict[str, float]:
        return ev.score(
            self.runner.labels_after(self.x, self.base_x, repair), self.runner.labels_after(self.t, self.base_t, repair)
        )


def evaluate_model(model_dir: str | Path, cfg: EfficacyConfig) -> list[dict]:
    """Every defense and ablation for one backdoored model; returns CSV rows."""
    model, meta = load_model(model_dir)
    attack = attack_from_spec(meta["attack"])
    dataset, arch = meta["dataset"], meta["model"]["arch"]
    ident = {"dataset": dataset, "model": Path(model_dir).name, "arch": arch, "attack": attack.name}
    rows: list[dict] = []

    def add(group: str, defense: str, metrics: dict, **setting) -> None:
        rows.append(row(ident, group, defense, metrics, **setting))

    ev = EvalSet.build(dataset, attack, cfg.test_limit, cfg.seed)
    n_pool = max(max(cfg.curve) if cfg.ablations else 0, cfg.n_poisoned)
    pool = zoo_calibration_set(dataset, attack, n_pool, cfg.n_clean, cfg.seed)
    poisoned = pool.triggered
    wanted = attack.target_labels(pool.original_labels, pool.num_classes)
    n = cfg.n_poisoned

    full = ChainRunner(model, [])
    none = ev.score(full.run(ev.clean, []).argmax(1).numpy(), full.run(ev.triggered, []).argmax(1).numpy())
    add("headline", "none", none)
    for name, transform in BASELINES.items():
        pred_x = full.run(transform(ev.clean), []).argmax(1).numpy()
        pred_t = full.run(transform(ev.triggered), []).argmax(1).numpy()
        add("headline", name, ev.score(pred_x, pred_t))

    auto = auto_calibrate(
        model, pool.originals[:n], poisoned[:n], pool.original_labels[:n], wanted[:n], pool.clean, pool.clean_labels,
        cfg.auto, cfg.seed,
    )  # fmt: skip
    s = auto.best.setting
    layers = usable_layers(model) if cfg.ablations else sorted({cfg.fixed_layer, s.layer})
    caches: dict[str, LayerCache] = {}
    for layer in tqdm(layers, desc=f"{ident['model']} layers", unit="layer", disable=None):
        caches[layer] = LayerCache(model, layer, ev, (pool.originals, poisoned), pool.clean)
    auto_cache = caches[s.layer]
    # The auto directions were fitted on half the clean samples (the other half checked the CA bound).
    add("headline", "FIRE auto", auto_cache.evaluate(ev, Repair(auto.directions)), layer=s.layer, mode=s.mode,
        alpha=s.alpha, rank=s.rank, estimator="paired", n_poisoned=n)  # fmt: skip
    fixed = caches[cfg.fixed_layer]
    for mode in ("subtract", "project", "gated"):
        d = fit_directions(fixed.inputs(n), cfg.fixed_layer, mode)
        add("headline", f"FIRE {mode}", fixed.evaluate(ev, Repair(d)), layer=cfg.fixed_layer, mode=mode, alpha=1.0,
            rank=1, estimator="paired", n_poisoned=n)  # fmt: skip
    beta = fit_directions(fixed.inputs(n), cfg.fixed_layer).beta
    gen = torch.Generator().manual_seed(cfg.seed)
    rand = torch.randn(beta.shape, generator=gen)
    rand *= float(np.linalg.norm(beta)) / rand.norm()
    d = fit_directions(fixed.inputs(n), cfg.fixed_layer, "subtract", beta=rand)
    add("headline", "random direction", fixed.evaluate(ev, Repair(d)), layer=cfg.fixed_layer, mode="subtract",
        alpha=1.0, rank=1, estimator="random", n_poisoned=n)  # fmt: skip

    if cfg.ablations:
        rows += _ablations(model, cfg, ev, caches, pool, poisoned, ident)
    if cfg.plots:
        plot_features(auto_cache, auto.directions, ev, Path(cfg.out) / f"efficacy_features_{ident['model']}.png")
    return rows


def _ablations(model, cfg: EfficacyConfig, ev: EvalSet, caches: dict[str, LayerCache], pool, poisoned, ident) -> list:
    rows: list[dict] = []
    n = cfg.n_poisoned

    def add(group: str, defense: str, metrics: dict, **setting) -> None:
        fire = {"alpha": 1.0, "rank": 1, "estimator": "paired", "n_poisoned": n}  # these rows' defaults
        rows.append(row(ident, group, defense, metrics, **{**fire, **setting}))

    for layer, cache in caches.items():
        for mode in ("subtract", "project", "gated"):
            d = fit_directions(cache.inputs(n), layer, mode)
            add("layer", f"FIRE {mode} @{layer}", cache.evaluate(ev, Repair(d)), layer=layer, mode=mode)
        for rank in (2, 4):
            d = fit_directions(cache.inputs(n), layer, "project", rank=rank)
            add("layer", f"FIRE project rank {rank} @{layer}", cache.evaluate(ev, Repair(d)), layer=layer,
                mode="project", rank=rank)  # fmt: skip

    fixed = caches[cfg.fixed_layer]
    feats = lambda images: fixed.runner.features(images).numpy()  # noqa: E731
    beta = unpaired_beta(feats, pool.clean, poisoned[:n], views=4, seed=cfg.seed)
    d = fit_directions(fixed.inputs(n), cfg.fixed_layer, "project", estimator="unpaired", beta=beta)
    add("estimator", "FIRE project unpaired", fixed.evaluate(ev, Repair(d)), layer=cfg.fixed_layer, mode="project",
        estimator="unpaired")  # fmt: skip
    d = fit_directions(fixed.inputs(n), cfg.fixed_layer, "project")
    add("estimator", "FIRE project paired", fixed.evaluate(ev, Repair(d)), layer=cfg.fixed_layer, mode="project")

    # PA against the number of triggered samples seen: offline (an independent draw of n) and streaming
    # (one running mean over a stream, updated one sample at a time, read when it has seen n).
    # "streaming unpaired" is what `fire update` does with reported samples: a running mean of the
    # triggered features minus the clean mean (no clean originals needed).
    rng = np.random.default_rng(cfg.seed + 7)
    stream, stream_p, seen = RunningMean(), RunningMean(), 0
    diffs = (fixed.pair_poisoned - fixed.pair_clean).numpy()
    clean_mean = RunningMean.of(fixed.clean.numpy())
    for k in tqdm(sorted(cfg.curve), desc=f"{ident['model']} curve", unit="n", disable=None):
        draw = np.sort(rng.choice(len(diffs), size=k, replace=False))
        d = fit_directions(fixed.inputs(idx=draw), cfg.fixed_layer, "project")
        add("curve", "offline", fixed.evaluate(ev, Repair(d)), layer=cfg.fixed_layer, mode="project", n_poisoned=k)
        while seen < k:
            stream.update(diffs[seen : seen + 1])
            stream_p.update(fixed.pair_poisoned[seen : seen + 1].numpy())
            seen += 1
        beta = unpaired_direction(clean_mean, stream_p)
        d = fit_directions(fixed.inputs(k), cfg.fixed_layer, "project", estimator="streaming", beta=beta)
        add("curve", "streaming unpaired", fixed.evaluate(ev, Repair(d)), layer=cfg.fixed_layer, mode="project",
            estimator="streaming-unpaired", n_poisoned=k)  # fmt: skip
        d = fit_directions(fixed.inputs(k), cfg.fixed_layer, "project", estimator="streaming",
                           beta=torch.from_numpy(stream.value()))  # fmt: skip
        add("curve", "streaming", fixed.evaluate(ev, Repair(d)), layer=cfg.fixed_layer, mode="project",
            estimator="streaming", n_poisoned=k)  # fmt: skip

    if {"layer1", "layer2"} <= caches.keys():
        rows.append(_two_layers(model, cfg, ev, caches, pool, poisoned, ident))
    return rows


def _two_layers(model, cfg: EfficacyConfig, ev: EvalSet, caches, pool, poisoned, ident) -> dict:
    """Project at layer1, then at layer2 with a direction estimated on layer1-repaired features."""
    n = cfg.n_poisoned
    first = Repair(fit_directions(caches["layer1"].inputs(n), "layer1", "project"))
    chain = ChainRunner(model, ["layer1", "layer2"])
    inputs = FitInputs(
        chain.run(pool.originals[:n], [first], stop=1),
        chain.run(poisoned[:n], [first], stop=1),
        chain.run(pool.clean, [first], stop=1),
    )
    second = Repair(fit_directions(inputs, "layer2", "project"))
    pred_x = chain.run(ev.clean, [first, second]).argmax(1).numpy()
    pred_t = chain.run(ev.triggered, [first, second]).argmax(1).numpy()
    return row(ident, "multilayer", "FIRE project @layer1+layer2", ev.score(pred_x, pred_t), layer="layer1+layer2",
                mode="project", alpha=1.0, rank=1, estimator="paired", n_poisoned=n)  # fmt: skip
