"""Efficacy benchmark: does FIRE stop the attacks in the zoo, and what does it cost clean accuracy?

For every model (each a backdoored model from ``fire train``, its attack read from model.json), on the
same test split and in one run:

- headline defenses: none; FIRE auto-calibrated (``calibration.auto``: layer, mode, alpha, rank chosen
  from the calibration samples alone); FIRE subtract / project / gated at a fixed layer; a random
  direction of beta's norm (control); input-transform baselines (ShrinkPad, JPEG, median, Gaussian);
- ablations: every repairable layer x mode; paired vs unpaired estimation; PA against the number of
  triggered calibration samples (offline: an independent draw of n; streaming: one running estimate
  updated sample by sample, read at n); one layer vs two (layer1 then layer2).

Calibration samples come from the training split, metrics from the test split. The repair runs in
process through the same torch head / repair / tail functions the served ensemble computes.

    fire bench efficacy            # or: python -m benchmarks.efficacy; writes results/efficacy*
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.input_transforms import BASELINES
from calibration.auto import AutoConfig, auto_calibrate, usable_layers
from calibration.calibrate import calibration_pool
from calibration.estimators import RunningMean, unpaired_direction
from calibration.inprocess import ChainRunner, FitInputs, SplitRunner, fit_directions
from fire_backend.attacks import Attack, attack_from_spec
from fire_backend.checkpoint import load_meta, load_model
from fire_backend.data import load_dataset
from fire_backend.export import sha256_file
from fire_backend.repair import Repair

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = (
    "models/cifar10_resnet_badnets",
    "models/cifar10_resnet_blended",
    "models/cifar10_resnet_wanet",
    "models/cifar10_resnet_sig",
    "models/cifar10_resnet_trojan",
    "models/cifar10_resnet_all2all",
    "models/cifar10_vgg_badnets",
    "models/gtsrb_resnet_badnets12",  # 12 epochs: the 8-epoch bundled one stops at ASR 89.7 %
)
CSV_FIELDS = (
    "dataset",
    "model",
    "arch",
    "attack",
    "group",
    "defense",
    "layer",
    "mode",
    "alpha",
    "rank",
    "estimator",
    "n_poisoned",
    "CA",
    "ASR",
    "PA",
)


@dataclass
class EfficacyConfig:
    models: tuple[str, ...] = DEFAULT_MODELS
    n_poisoned: int = 50  # triggered calibration samples for the headline defenses
    n_clean: int = 1000  # clean calibration samples (the defender's own data)
    curve: tuple[int, ...] = (1, 5, 10, 50, 100, 500)
    fixed_layer: str = "layer2"  # where the fixed-setting FIRE rows repair
    ablations: bool = True
    test_limit: int = 0  # 0: the whole test split; N: a seeded subset (tests)
    auto: AutoConfig = field(default_factory=AutoConfig)
    seed: int = 0
    out: str = "results"
    plots: bool = True


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


def _row(ident: dict, group: str, defense: str, metrics: dict, **setting) -> dict:
    """One CSV row; settings a defense does not have stay empty."""
    empty = {"layer": "", "mode": "", "alpha": "", "rank": "", "estimator": "", "n_poisoned": ""}
    return {**ident, "group": group, "defense": defense, **empty, **setting, **metrics}


def _headline(rows: list[dict], model: str) -> dict[str, dict]:
    """A model's headline rows by defense name."""
    return {r["defense"]: r for r in rows if r["model"] == model and r["group"] == "headline"}


def _clean_twins(models_dir: Path) -> dict[tuple[str, str], tuple[str, float]]:
    """(dataset, arch) -> (model dir, CA) of clean models (poison rate 0) trained with the same recipe."""
    out = {}
    for meta_path in sorted(models_dir.glob("*/model.json")):
        meta = json.loads(meta_path.read_text())
        if meta.get("attack", {}).get("poison_rate", 1) == 0:
            out[(meta["dataset"], meta["model"]["arch"])] = (meta_path.parent.name, 100 * meta["metrics"]["CA"])
    return out


def evaluate_model(model_dir: str | Path, cfg: EfficacyConfig) -> list[dict]:
    """Every defense and ablation for one backdoored model; returns CSV rows."""
    model, meta = load_model(model_dir)
    attack = attack_from_spec(meta["attack"])
    dataset, arch = meta["dataset"], meta["model"]["arch"]
    ident = {"dataset": dataset, "model": Path(model_dir).name, "arch": arch, "attack": attack.name}
    rows: list[dict] = []

    def add(group: str, defense: str, metrics: dict, **setting) -> None:
        rows.append(_row(ident, group, defense, metrics, **setting))

    ev = EvalSet.build(dataset, attack, cfg.test_limit, cfg.seed)
    n_pool = max(max(cfg.curve) if cfg.ablations else 0, cfg.n_poisoned)
    pool = calibration_pool(dataset, attack, n_pool, cfg.n_clean, cfg.seed)
    poisoned = attack.apply(pool.to_poison)
    wanted = attack.target_labels(pool.poison_labels, pool.num_classes)
    n = cfg.n_poisoned

    full = ChainRunner(model, [])
    none = ev.score(full.run(ev.clean, []).argmax(1).numpy(), full.run(ev.triggered, []).argmax(1).numpy())
    add("headline", "none", none)
    for name, transform in BASELINES.items():
        pred_x = full.run(transform(ev.clean), []).argmax(1).numpy()
        pred_t = full.run(transform(ev.triggered), []).argmax(1).numpy()
        add("headline", name, ev.score(pred_x, pred_t))

    auto = auto_calibrate(
        model, pool.to_poison[:n], poisoned[:n], pool.poison_labels[:n], wanted[:n], pool.clean, pool.clean_labels,
        cfg.auto, cfg.seed,
    )  # fmt: skip
    s = auto.best.setting
    layers = usable_layers(model) if cfg.ablations else sorted({cfg.fixed_layer, s.layer})
    caches: dict[str, LayerCache] = {}
    for layer in tqdm(layers, desc=f"{ident['model']} layers", unit="layer"):
        caches[layer] = LayerCache(model, layer, ev, (pool.to_poison, poisoned), pool.clean)
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
    rand *= beta.norm() / rand.norm()
    d = fit_directions(fixed.inputs(n), cfg.fixed_layer, "subtract", beta=rand)
    add("headline", "random direction", fixed.evaluate(ev, Repair(d)), layer=cfg.fixed_layer, mode="subtract",
        alpha=1.0, rank=1, estimator="random", n_poisoned=n)  # fmt: skip

    if cfg.ablations:
        rows += _ablations(model, cfg, ev, caches, pool, poisoned, ident)
    if cfg.plots:
        _plot_features(auto_cache, auto.directions, ev, Path(cfg.out) / f"efficacy_features_{ident['model']}.png")
    return rows


def _ablations(model, cfg: EfficacyConfig, ev: EvalSet, caches: dict[str, LayerCache], pool, poisoned, ident) -> list:
    rows: list[dict] = []
    n = cfg.n_poisoned

    def add(group: str, defense: str, metrics: dict, **setting) -> None:
        fire = {"alpha": 1.0, "rank": 1, "estimator": "paired", "n_poisoned": n}  # these rows' defaults
        rows.append(_row(ident, group, defense, metrics, **{**fire, **setting}))

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
    beta = torch.from_numpy(unpaired_direction(feats, pool.clean, poisoned[:n], seed=cfg.seed))
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
    clean_mean = fixed.clean.double().mean(0).numpy()
    for k in tqdm(sorted(cfg.curve), desc=f"{ident['model']} curve", unit="n"):
        draw = np.sort(rng.choice(len(diffs), size=k, replace=False))
        d = fit_directions(fixed.inputs(idx=draw), cfg.fixed_layer, "project")
        add("curve", "offline", fixed.evaluate(ev, Repair(d)), layer=cfg.fixed_layer, mode="project", n_poisoned=k)
        while seen < k:
            stream.update(diffs[seen : seen + 1])
            stream_p.update(fixed.pair_poisoned[seen : seen + 1].numpy())
            seen += 1
        beta = torch.from_numpy((stream_p.mean - clean_mean).astype(np.float32))
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
        chain.run(pool.to_poison[:n], [first], stop=1),
        chain.run(poisoned[:n], [first], stop=1),
        chain.run(pool.clean, [first], stop=1),
    )
    second = Repair(fit_directions(inputs, "layer2", "project"))
    pred_x = chain.run(ev.clean, [first, second]).argmax(1).numpy()
    pred_t = chain.run(ev.triggered, [first, second]).argmax(1).numpy()
    return _row(ident, "multilayer", "FIRE project @layer1+layer2", ev.score(pred_x, pred_t), layer="layer1+layer2",
                mode="project", alpha=1.0, rank=1, estimator="paired", n_poisoned=n)  # fmt: skip


def _plot_features(cache: LayerCache, directions, ev: EvalSet, path: Path, n: int = 400) -> None:
    """Clean vs triggered test features before and after repair, on two axes: the trigger direction b
    and the clean features' first principal direction orthogonal to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    repair = Repair(directions)
    x, t = cache.x[:n].reshape(min(n, len(cache.x)), -1), cache.t[:n].reshape(min(n, len(cache.t)), -1)
    b = repair.unit
    centred = x - x.mean(0)
    centred = centred - torch.outer(centred @ b, b)
    v = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True, sharey=True)
    for ax, title, edit in ((axes[0], "before repair", None), (axes[1], f"after FIRE ({directions.mode})", repair)):
        for feats, label, colour in ((x, "clean", "tab:blue"), (t, "triggered", "tab:red")):
            f = edit(feats.reshape(len(feats), *cache.x.shape[1:])).reshape(len(feats), -1) if edit else feats
            ax.scatter((f @ v).numpy(), (f @ b).numpy(), s=5, alpha=0.5, c=colour, label=label)
        ax.set_title(title)
        ax.set_xlabel("clean principal direction")
    axes[0].set_ylabel("trigger direction b")
    axes[0].legend()
    fig.suptitle(f"{path.stem.removeprefix('efficacy_features_')}: features after {cache.layer}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _targets(rows: list[dict]) -> list[str]:
    """Issue targets for auto-calibrated FIRE, per model (all-to-all excluded by design)."""
    out = [
        "| model | attack | CA none | CA auto | CA drop (<= 0.5) | ASR auto (<= 3) | PA auto | PA >= CA none - 3 "
        "| beats every input transform |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        head = _headline(rows, model)
        none, auto = head["none"], head["FIRE auto"]
        drop = none["CA"] - auto["CA"]
        short = none["CA"] - 3 - auto["PA"]
        beaten = [b for b in BASELINES if not (auto["PA"] > head[b]["PA"] and auto["CA"] >= head[b]["CA"])]
        note = " (not a target: all-to-all)" if auto["attack"] == "badnets_all2all" else ""
        out.append(
            f"| {model}{note} | {auto['attack']} | {none['CA']:.2f} | {auto['CA']:.2f} | "
            f"{drop:.2f} {'ok' if drop <= 0.5 else 'MISS'} | "
            f"{auto['ASR']:.2f} {'ok' if auto['ASR'] <= 3 else 'MISS'} | "
            f"{auto['PA']:.2f} | {'ok' if short <= 0 else f'MISS by {short:.2f}'} | "
            f"{'ok' if not beaten else 'no: ' + ', '.join(beaten)} |"
        )
    return out


def write_report(rows: list[dict], cfg: EfficacyConfig, seconds: float, models_dir: Path) -> list[Path]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "efficacy.csv"]
    with written[0].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r[k]) for k in CSV_FIELDS})
    twins = _clean_twins(models_dir)
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        rs = [r for r in rows if r["dataset"] == dataset]
        lines = [
            f"# FIRE efficacy on {dataset}",
            "",
            f"`fire bench efficacy` ({', '.join(f'{k}={v}' for k, v in asdict(cfg).items() if k != 'auto')}); "
            f"evaluation time, summed over models, {seconds / 60:.1f} min on this machine (2 cores, shared with "
            f"other jobs while it ran). "
            f"Test split: every metric; training split: every "
            f"calibration sample. CA / ASR / PA in %. Headline FIRE rows use {cfg.n_poisoned} triggered samples.",
            "",
            "## The models",
            "",
            "| model | attack | CA | ASR | clean model, same recipe | its CA | CA gap (<= 3) | counts (ASR >= 90) |",
            "|---|---|---:|---:|---|---:|---:|---|",
        ]
        for model in dict.fromkeys(r["model"] for r in rs):
            meta = load_meta(models_dir / model)
            ca, asr = 100 * meta["metrics"]["CA"], 100 * meta["metrics"]["ASR"]
            twin, twin_ca = twins.get((dataset, meta["model"]["arch"]), ("-", float("nan")))
            gap = twin_ca - ca
            if asr < 90:
                ok = f"no (ASR {asr:.1f} < 90)"
            elif twin == "-":
                ok = "ASR yes; CA: no clean twin trained"
            else:
                ok = "yes" if gap <= 3 else f"no (CA gap {gap:.1f} > 3)"
            lines.append(f"| {model} | {meta['attack']['name']} | {ca:.2f} | {asr:.2f} | {twin} | {twin_ca:.2f} | "
                         f"{gap:.2f} | {ok} |")  # fmt: skip
        lines += ["", "## Targets (auto-calibrated FIRE)", "", *_targets(rs), ""]
        for group, title in (
            ("headline", "Defenses"),
            ("layer", "Ablation: layer x mode"),
            ("estimator", "Ablation: paired vs unpaired"),
            ("curve", "Ablation: number of triggered calibration samples"),
            ("multilayer", "One layer vs two"),
        ):
            sel = [r for r in rs if r["group"] == group]
            if not sel:
                continue
            lines += [f"## {title}", "", "| model | defense | layer | mode | alpha | rank | n | CA | ASR | PA |"]
            lines.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
            for r in sel:
                lines.append(
                    f"| {r['model']} | {r['defense']} | {r['layer']} | {r['mode']} | {_fmt(r['alpha'])} | "
                    f"{r['rank']} | {r['n_poisoned']} | {r['CA']:.2f} | {r['ASR']:.2f} | {r['PA']:.2f} |"
                )
            lines.append("")
        path = out / f"efficacy_{dataset}.md"
        path.write_text("\n".join(lines))
        written.append(path)
    written.append(_overview(rows, out / "efficacy.md", seconds))
    if cfg.plots:
        written += _plots(rows, out)
    return written


def _overview(rows: list[dict], path: Path, seconds: float) -> Path:
    """One line per model: no defense, auto-calibrated FIRE, the best input transform (by PA)."""
    lines = [
        "# FIRE efficacy: overview",
        "",
        f"Every model, the whole test split unless limited, "
        f"{max(r['n_poisoned'] for r in rows if r['defense'] == 'FIRE auto')} triggered calibration samples; "
        f"evaluation time {seconds / 60:.1f} min. CA / ASR / PA in %. "
        "Per-dataset tables with every defense and ablation: efficacy_<dataset>.md.",
        "",
        "| model | attack | none CA / ASR / PA | FIRE auto: setting | FIRE auto CA / ASR / PA "
        "| best input transform | its CA / ASR / PA |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        head = _headline(rows, model)
        none, auto = head["none"], head["FIRE auto"]
        best = max((head[b] for b in BASELINES), key=lambda r: r["PA"])
        trio = lambda r: f"{r['CA']:.2f} / {r['ASR']:.2f} / {r['PA']:.2f}"  # noqa: E731
        setting = f"{auto['mode']} @{auto['layer']}, alpha {auto['alpha']}, rank {auto['rank']}"
        lines.append(
            f"| {model} | {auto['attack']} | {trio(none)} | {setting} | {trio(auto)} | {best['defense']} "
            f"| {trio(best)} |"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def _plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    paths = []
    curve = [r for r in rows if r["group"] == "curve"]
    if curve:
        cols = min(4, len(models))
        grid_rows = (len(models) + cols - 1) // cols
        fig, axes = plt.subplots(grid_rows, cols, figsize=(4 * cols, 3.3 * grid_rows), squeeze=False)
        for ax, model in zip(axes.flat, models, strict=False):
            ca = next(r["CA"] for r in rows if r["model"] == model and r["defense"] == "none")
            for kind, style in (("offline", "o-"), ("streaming", "s--"), ("streaming unpaired", "^:")):
                sel = [r for r in curve if r["model"] == model and r["defense"] == kind]
                line = ax.plot([r["n_poisoned"] for r in sel], [r["PA"] for r in sel], style, label=f"PA {kind}")
                ax.plot([r["n_poisoned"] for r in sel], [r["CA"] for r in sel], style, color=line[0].get_color(),
                        alpha=0.35, lw=1, label=f"CA {kind}")  # fmt: skip
            ax.axhline(ca, color="grey", lw=1, ls=":", label="CA, no defense")
            ax.set_xscale("log")
            ax.set_title(model, fontsize=9)
            ax.set_xlabel("triggered calibration samples")
            ax.set_ylim(0, 100)
        for ax in list(axes.flat)[len(models) :]:
            ax.axis("off")
        axes.flat[0].set_ylabel("%")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "efficacy_pa_vs_n.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    defenses = list(dict.fromkeys(r["defense"] for r in rows if r["group"] == "headline"))
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 2.4 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models, strict=True):
        head = _headline(rows, model)
        xs = np.arange(len(defenses))
        ax.bar(xs - 0.2, [head[d]["CA"] for d in defenses], 0.4, label="CA")
        ax.bar(xs + 0.2, [head[d]["PA"] for d in defenses], 0.4, label="PA")
        ax.plot(xs, [head[d]["ASR"] for d in defenses], "kx", label="ASR")
        ax.set_xticks(xs, defenses if ax is axes[-1, 0] else [""] * len(defenses), rotation=25, fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel(model, fontsize=8)
    axes[0, 0].legend(ncol=3, fontsize=8)
    fig.tight_layout()
    paths.append(out / "efficacy_defenses.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def run_efficacy(cfg: EfficacyConfig | None = None, models_dir: str | Path | None = None) -> list[Path]:
    """Evaluate every model and write the report. Each model's rows are kept in
    ``OUT/efficacy_runs/MODEL.json`` and reused by a later run with the same config and weights, so an
    interrupted run resumes where it stopped (delete the folder to start over)."""
    cfg = cfg or EfficacyConfig()
    models_dir = Path(models_dir) if models_dir else REPO_ROOT / "models"
    runs = Path(cfg.out) / "efficacy_runs"
    runs.mkdir(parents=True, exist_ok=True)
    key = json.dumps({k: v for k, v in asdict(cfg).items() if k not in ("models", "out", "plots")}, sort_keys=True)
    rows: list[dict] = []
    seconds = 0.0
    for model in tqdm(cfg.models, desc="efficacy", unit="model"):
        path = Path(model) if Path(model).is_absolute() or Path(model).exists() else REPO_ROOT / model
        weights = sha256_file(path / "model.safetensors")
        cached = runs / f"{path.name}.json"
        if cached.is_file():
            saved = json.loads(cached.read_text())
            if saved["config"] == key and saved["weights"] == weights:
                rows += saved["rows"]
                seconds += saved["seconds"]
                continue
        t0 = time.time()
        model_rows = evaluate_model(path, cfg)
        took = time.time() - t0
        cached.write_text(json.dumps({"config": key, "weights": weights, "seconds": took, "rows": model_rows}))
        rows += model_rows
        seconds += took
    return write_report(rows, cfg, seconds, models_dir)


if __name__ == "__main__":
    for p in run_efficacy():
        print(p)
