"""``fire bench traffic``: FIRE from unlabeled traffic, beside the defenses that are given more.

For each zoo model (and the clean twin), the CIFAR-10/GTSRB test split is cut in two (seeded): a
traffic pool and an evaluation half. Traffic of N requests with a share p triggered is drawn from the
pool and recorded exactly as the server's tail records it (``TrafficStats``: per predicted class,
bounded reservoirs of the repair-layer features); ``calibration.traffic.propose`` detects, estimates and
checks a direction with the defender's 1,000 clean training images as the only other input, and it is
deployed only when every check passes. Every defense is measured on the evaluation half:

- no defense; FIRE from traffic (what it deployed, or nothing);
- FIRE paired (50 triggered training images with their originals: the upper bound) and unpaired (50
  flagged triggered images), project at the same layer;
- STRIP used as "reject flagged inputs" (``benchmarks.defenses.strip``: 10 superimpositions at full
  weight, threshold at 1 % false rejections on the defender's clean images; a rejected input counts as
  not correct), with its detection rate, AUROC and cost per request;
- fine-tuning on the same 1,000 clean images, plain and fine-pruning (30 % of the channels of the
  last feature map, the least active on clean data, pruned first), and its time.

ASR is also shown above the clean twin's floor (the share of triggered images a model without a
backdoor sends to the target class). Clean traffic (p = 0) on every model, and the clean twin over 20
independent draws, must deploy nothing. Writes results/efficacy_traffic.{md,csv,png}.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from calibration.calibrate import zoo_calibration_set
from calibration.inprocess import SplitRunner
from calibration.traffic import TrafficConfig, propose
from fire_backend.formula import NumpyRepair
from fire_backend.names import PROJECT_ROOT
from fire_backend.traffic import TrafficStats
from zoo.attacks import attack_from_spec, make_attack
from zoo.checkpoint import load_model
from zoo.data import load_dataset

VALID = (
    "cifar10_resnet_badnets",
    "cifar10_resnet_blended",
    "cifar10_resnet_trojan",
    "cifar10_vgg_badnets",
    "gtsrb_resnet_badnets12",
)  # fmt: skip  (ASR >= 90, CA within 3 of the clean twin where one exists)
SUBTLE = ("cifar10_resnet_wanet", "cifar10_resnet_sig")
FIELDS = ("model", "attack", "defense", "N", "p", "draw", "detected", "target_named", "deployed", "score", "next_score",
          "CA", "ASR", "PA", "ASR_above_floor", "seconds")  # fmt: skip


@dataclass
class TrafficBenchConfig:
    models: tuple[str, ...] = VALID + SUBTLE
    clean_twin: str = "cifar10_resnet_clean"
    sizes: tuple[int, ...] = (200, 1000, 5000)
    rates: tuple[float, ...] = (0.01, 0.05, 0.10, 0.20)
    clean_draws: int = 20
    curve_model: str = "cifar10_resnet_badnets"
    curve_sizes: tuple[int, ...] = (50, 100, 200, 500, 1000, 2000, 5000)
    layer: str = "layer2"
    n_clean: int = 1000
    n_poisoned: int = 50
    baselines: bool = True
    seed: int = 0
    out: Path = PROJECT_ROOT / "results"

    @classmethod
    def quick(cls) -> TrafficBenchConfig:
        return cls(models=("cifar10_resnet_badnets",), sizes=(1000,), rates=(0.10,), clean_draws=2,
                   curve_sizes=(200, 1000), baselines=False)  # fmt: skip


class Bench:
    """One model: its split runner, the evaluation half's features, the traffic pool, the clean reference."""

    def __init__(self, name: str, cfg: TrafficBenchConfig, attack_spec: dict | None = None):
        self.name, self.cfg = name, cfg
        self.model, meta = load_model(PROJECT_ROOT / "models" / name)
        self.attack = attack_from_spec(attack_spec or meta["attack"])
        self.dataset = meta["dataset"]
        self.runner = SplitRunner(self.model, cfg.layer)
        test = load_dataset(self.dataset, "test")
        self.num_classes = test.num_classes
        order = np.random.default_rng(cfg.seed).permutation(len(test))
        pool, ev = order[: len(test) // 2], order[len(test) // 2 :]
        self.pool_images, self.pool_labels = test.images[pool], test.labels[pool]
        self.ev_labels = test.labels[ev]
        keep = self.attack.counts_for_asr(self.ev_labels)
        self.ev_true = self.ev_labels[keep]
        self.ev_wanted = self.attack.target_labels(self.ev_true, self.num_classes)
        self.ev_images_clean, self.ev_images_trig = test.images[ev], self.attack.apply(test.images[ev][keep])
        self.ev_x, self.ev_t = self.runner.features(self.ev_images_clean), self.runner.features(self.ev_images_trig)
        self.base_x, self.base_t = self.runner.labels(self.ev_x), self.runner.labels(self.ev_t)
        self.calib = zoo_calibration_set(self.dataset, self.attack, cfg.n_poisoned, cfg.n_clean, cfg.seed)
        self.clean = self.runner.features(self.calib.clean)
        self.clean_pred = self.runner.labels(self.clean)

    def metrics(self, pred_x: np.ndarray, pred_t: np.ndarray) -> dict[str, float]:
        return {"CA": 100 * float((pred_x == self.ev_labels).mean()),
                "ASR": 100 * float((pred_t == self.ev_wanted).mean()),
                "PA": 100 * float((pred_t == self.ev_true).mean())}  # fmt: skip

    def repaired_torch(self, repair) -> dict[str, float]:
        return self.metrics(self.runner.labels_after(self.ev_x, self.base_x, repair),
                            self.runner.labels_after(self.ev_t, self.base_t, repair))  # fmt: skip

    def repaired(self, repair) -> dict[str, float]:
        return self.metrics(self.runner.labels_after(self.ev_x, self.base_x, _torch(repair)),
                            self.runner.labels_after(self.ev_t, self.base_t, _torch(repair)))  # fmt: skip

    def traffic(self, n: int, p: float, rng: np.random.Generator, attack=None) -> tuple[np.ndarray, np.ndarray]:
        """Features and predicted labels of N requests from the pool, a share p of them triggered."""
        attack = attack or self.attack
        n_trig = int(round(p * n))
        candidates = np.flatnonzero(attack.counts_for_asr(self.pool_labels))
        trig_idx = rng.choice(candidates, n_trig, replace=False) if n_trig else np.zeros(0, np.int64)
        rest = np.setdiff1d(np.arange(len(self.pool_labels)), trig_idx)
        clean_idx = rng.choice(rest, n - n_trig, replace=False)
        images = np.concatenate([self.pool_images[clean_idx], attack.apply(self.pool_images[trig_idx])])
        feats = self.runner.features(images[rng.permutation(len(images))])
        return feats.numpy(), self.runner.labels(feats)

    def from_traffic(self, n: int, p: float, rng: np.random.Generator, tcfg: TrafficConfig, attack=None) -> dict:
        t0 = time.time()
        feats, pred = self.traffic(n, p, rng, attack)
        stats = TrafficStats(self.num_classes, int(np.prod(feats.shape[1:])), seed=int(rng.integers(1 << 30)))
        for i in range(0, len(feats), 64):  # as the server's tail records it, batch by batch
            stats.update(feats[i : i + 64], pred[i : i + 64])
        tail = lambda f: self.runner.labels(torch.from_numpy(f))  # noqa: E731
        proposal = propose(stats, self.clean.numpy(), self.clean_pred, tail, layer=self.cfg.layer,
                           head_sha256="traffic-bench", clean_labels=self.calib.clean_labels, cfg=tcfg)  # fmt: skip
        deployed = proposal.deployable
        m = self.repaired(NumpyRepair(proposal.directions)) if deployed else self.metrics(self.base_x, self.base_t)
        named = proposal.detected and proposal.target == self.attack.target
        return {"detected": proposal.detected, "target_named": named, "deployed": deployed,
                "score": round(proposal.score, 2), "next_score": round(proposal.next_score, 2),
                "seconds": round(time.time() - t0, 1), **m}  # fmt: skip


def _torch(repair: NumpyRepair):
    """The NumPy serving form as an editor of torch features (the split runner's)."""
    return lambda f: torch.from_numpy(repair(f.numpy()))


def _given_more(b: Bench) -> list[dict]:
    """FIRE paired and unpaired from 50 triggered calibration images, at the same layer and with the same
    spatial views as ``fire calibrate`` (``benchmarks.adaptive.fire_repairs``)."""
    from benchmarks.adaptive import fire_repairs

    repairs = fire_repairs(_AsModel(b), b.cfg.layer)
    return [{"defense": f"{name} (50 {'flagged' if 'unpaired' in name else 'pairs'})", **b.repaired_torch(rep)}
            for name, rep in repairs.items() if name != "FIRE rank 1, paired"]  # fmt: skip


class _AsModel:
    """The parts of ``benchmarks.adaptive._Model`` that ``fire_repairs`` reads."""

    def __init__(self, b: Bench):
        self.calib, self.runner = b.calib, b.runner


def _baselines(b: Bench) -> list[dict]:
    """STRIP (reject), fine-tuning and fine-pruning (``benchmarks.defenses``) on the evaluation half."""
    from benchmarks.defenses import Context, FinePruning, Strip, detection, timed

    ctx = Context(b.model, b.calib.clean, b.calib.clean_labels, b.cfg.seed)
    rows = []
    for defense in (Strip(), FinePruning(0.0), FinePruning(0.3)):
        t0 = time.time()
        defense.fit(ctx)
        fitted = time.time() - t0
        clean, ms = timed(defense, b.ev_images_clean)
        trig = defense(b.ev_images_trig)
        label = f"{defense.name} ({ms:.2f} ms/image)" if defense.kind == "detect" else \
            f"{defense.name} on 1,000 clean ({fitted:.0f} s)"  # fmt: skip
        if clean.scores is not None:
            tpr, area = detection(clean, b.base_x == b.ev_labels, trig, b.base_t == b.ev_wanted)
            label += f", TPR {tpr:.1f} % at 1 % FPR, AUROC {area:.3f}"
        rows.append({"defense": label, **b.metrics(clean.labels, trig.labels)})
    return rows


def run_traffic(cfg: TrafficBenchConfig | None = None) -> Path:
    cfg = cfg or TrafficBenchConfig()
    tcfg = TrafficConfig(seed=cfg.seed)
    rows: list[dict] = []
    floors: dict[str, float] = {}
    twin = Bench(cfg.clean_twin, cfg, make_attack("badnets").spec())
    floors["cifar10"] = twin.metrics(twin.base_x, twin.base_t)["ASR"]  # the clean model's own "ASR"
    for model in tqdm(cfg.models, desc="traffic", unit="model", disable=None):
        b = Bench(model, cfg)
        floor = floors.get(b.dataset)
        ident = {"model": model, "attack": b.attack.name}
        measured = [{"defense": "none", **b.metrics(b.base_x, b.base_t)}]
        if cfg.baselines:
            measured += [*_given_more(b), *_baselines(b)]
        rng = np.random.default_rng(cfg.seed + 1)
        for n in cfg.sizes:
            for p in (0.0, *cfg.rates):
                measured.append({"defense": "FIRE from traffic", "N": n, "p": p, **b.from_traffic(n, p, rng, tcfg)})
        if model == cfg.curve_model:
            for n in cfg.curve_sizes:
                r = b.from_traffic(n, 0.10, rng, tcfg)
                measured.append({"defense": "FIRE from traffic (curve)", "N": n, "p": 0.10, **r})
        for r in measured:
            above = round(r["ASR"] - floor, 2) if floor is not None else ""
            rows.append({**ident, **r, "ASR_above_floor": above})
    rng = np.random.default_rng(cfg.seed + 2)
    for p, attack in ((0.0, None), (0.10, make_attack("badnets"))):  # the clean twin never learned the trigger
        for draw in range(cfg.clean_draws):
            r = twin.from_traffic(1000, p, rng, tcfg, attack)
            rows.append({"model": cfg.clean_twin, "attack": "none", "defense": "FIRE from traffic", "N": 1000, "p": p,
                         "draw": draw, **r, "ASR_above_floor": ""})  # fmt: skip
    return write_traffic(rows, cfg, floors)


def write_traffic(rows: list[dict], cfg: TrafficBenchConfig, floors: dict[str, float]) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "efficacy_traffic.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)
    fmt = lambda r: f"{r['CA']:.2f} / {r['ASR']:.2f} / {r['PA']:.2f}"  # noqa: E731
    lines = [
        "# FIRE from unlabeled traffic",
        "",
        f"`fire bench traffic` ({', '.join(f'{k}={v}' for k, v in asdict(cfg).items() if k not in ('out',))}). "
        "Each test split is cut in two: traffic is drawn from one half, every metric is measured on the other. "
        "CA / ASR / PA in %. The clean twin's ASR floor on CIFAR-10 (triggered images a model without a backdoor "
        f"sends to class 0): {floors.get('cifar10', float('nan')):.2f} %.",
        "",
        "## Defenses given more than traffic (evaluation half)",
        "",
        "| model | defense | CA / ASR / PA | ASR above floor |",
        "|---|---|---|---:|",
    ]
    for r in rows:
        if r["defense"] != "FIRE from traffic" and "curve" not in r["defense"]:
            lines.append(f"| {r['model']} | {r['defense']} | {fmt(r)} | {r['ASR_above_floor']} |")
    lines += ["", "## FIRE from traffic", "",
              "| model | N | p | detected | target named | deployed | score (next) | CA / ASR / PA | ASR above floor |",
              "|---|---:|---:|---|---|---|---|---|---:|"]  # fmt: skip
    for r in rows:
        if r["defense"] == "FIRE from traffic" and r["model"] != cfg.clean_twin:
            cells = [r["model"], r["N"], f"{r['p']:.0%}", r["detected"], r["target_named"], r["deployed"],
                     f"{r['score']} ({r['next_score']})", fmt(r), r["ASR_above_floor"]]  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    twin = [r for r in rows if r["model"] == cfg.clean_twin]
    for p in sorted({r["p"] for r in twin}):
        sel = [r for r in twin if r["p"] == p]
        kind = "clean traffic" if not p else "a trigger it never learned"
        detected, deployed = sum(r["detected"] for r in sel), sum(r["deployed"] for r in sel)
        lines += ["", f"Clean twin, N = 1000, p = {p:.0%} ({kind}), {len(sel)} draws: detected {detected}, "
                  f"deployed {deployed}; max score {max(r['score'] for r in sel):.2f}."]  # fmt: skip
    curve = [r for r in rows if "curve" in r["defense"]]
    if curve:
        lines += ["", f"## As traffic accumulates ({cfg.curve_model}, p = 10 %)", "",
                  "| N | deployed | CA / ASR / PA |", "|---:|---|---|",
                  *(f"| {r['N']} | {r['deployed']} | {fmt(r)} |" for r in curve)]  # fmt: skip
    lines += ["", "Command: `fire bench traffic`", ""]
    (out / "efficacy_traffic.md").write_text("\n".join(lines))
    _plot(rows, cfg, out / "efficacy_traffic.png")
    return out / "efficacy_traffic.md"


def _plot(rows: list[dict], cfg: TrafficBenchConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    curve = [r for r in rows if "curve" in r["defense"]]
    if curve:
        ax = axes[0]
        for key, style in (("PA", "o-"), ("ASR", "x--"), ("CA", "s:")):
            ax.plot([r["N"] for r in curve], [r[key] for r in curve], style, label=key)
        ax.set_xscale("log")
        ax.set_xlabel("requests observed (10 % triggered)")
        ax.set_ylabel("%")
        ax.set_title(f"{cfg.curve_model}: FIRE from traffic")
        ax.legend()
    ax = axes[1]
    for model in cfg.models:
        sel = [r for r in rows if r["model"] == model and r["defense"] == "FIRE from traffic" and r["N"] == 1000]
        if sel:
            ax.plot([100 * r["p"] for r in sel], [r["PA"] for r in sel], "o-", label=model.replace("cifar10_", ""))
    ax.set_xlabel("share of traffic triggered (%), N = 1000")
    ax.set_ylabel("PA %")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
