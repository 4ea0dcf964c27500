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
- STRIP used as "reject flagged inputs" (8 superimpositions, threshold at 1 % false rejections on the
  clean images; a rejected input counts as not correct), and its cost per request;
- fine-tuning on the same 1,000 clean images (plain, and fine-pruning: 30 % of the last stage's channels,
  the least active on clean data, pruned first), and its time.

ASR is also shown above the clean twin's floor (the share of triggered images a model without a
backdoor sends to the target class). Clean traffic (p = 0) on every model, and the clean twin over 20
independent draws, must deploy nothing. Writes results/efficacy_traffic.{md,csv,png}.
"""

from __future__ import annotations

import copy
import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from calibration.calibrate import unpaired_beta, zoo_calibration_set
from calibration.factory import FitInputs, fit_directions
from calibration.inprocess import SplitRunner
from calibration.traffic import TrafficConfig, propose
from fire_backend.formula import NumpyRepair
from fire_backend.names import PROJECT_ROOT
from fire_backend.traffic import TrafficStats
from zoo.attacks import attack_from_spec, make_attack
from zoo.checkpoint import load_model
from zoo.data import load_dataset, to_tensor_batch

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
    """FIRE paired and unpaired from 50 triggered calibration images, at the same layer."""
    c = b.calib
    inputs = FitInputs(b.runner.features(c.originals), b.runner.features(c.triggered), b.clean)
    rows = [{"defense": "FIRE paired (50 pairs)", **b.repaired(NumpyRepair(fit_directions(inputs, b.cfg.layer)))}]
    beta = unpaired_beta(lambda x: b.runner.features(x).numpy(), c.clean, c.triggered, views=4, seed=b.cfg.seed)
    d = fit_directions(inputs, b.cfg.layer, estimator="unpaired", beta=beta)
    rows.append({"defense": "FIRE unpaired (50 flagged)", **b.repaired(NumpyRepair(d))})
    return rows


@torch.inference_mode()
def _strip(b: Bench, k: int = 8) -> dict:
    """STRIP as a filter: reject inputs whose superimpositions with clean images stay confident."""
    model, rng = b.model.eval(), np.random.default_rng(b.cfg.seed)
    pool = b.calib.clean

    def entropy(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ent, pred = [], []
        for i in range(0, len(images), 250):
            x = images[i : i + 250].astype(np.float32)
            logits = model(torch.from_numpy(to_tensor_batch(x.astype(np.uint8))))
            pred.append(logits.argmax(1).numpy())
            h = np.zeros(len(x))
            for _ in range(k):
                blend = ((x + pool[rng.integers(len(pool), size=len(x))]) / 2).round().astype(np.uint8)
                prob = F.softmax(model(torch.from_numpy(to_tensor_batch(blend))), 1).clamp_min(1e-12)
                h += -(prob * prob.log()).sum(1).numpy() / k
            ent.append(h)
        return np.concatenate(ent), np.concatenate(pred)

    threshold = np.quantile(entropy(b.calib.clean[:500])[0], 0.01)  # 1 % of clean inputs rejected
    t0 = time.time()
    ex, px = entropy(b.ev_images_clean)
    per_image = (time.time() - t0) / len(b.ev_images_clean)
    et, pt = entropy(b.ev_images_trig)
    px = np.where(ex < threshold, -1, px)  # a rejected input is not correct (and not the attacker's either)
    pt = np.where(et < threshold, -1, pt)
    t1 = time.time()
    model(torch.from_numpy(to_tensor_batch(b.ev_images_clean[:500])))
    plain = (time.time() - t1) / 500
    return {"defense": f"STRIP (reject; {per_image * 1e3:.2f} ms/image, {per_image / plain:.0f}x a forward pass)",
            **b.metrics(px, pt)}  # fmt: skip


def _fine_tune(b: Bench, prune: float) -> dict:
    """Fine-tune a copy of the model on the 1,000 clean images (after pruning the least active channels
    of the last stage, for fine-pruning)."""
    t0 = time.time()
    model = copy.deepcopy(b.model).train()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    if prune:
        acts = []
        hook = last.register_forward_hook(lambda _m, _i, out: acts.append(out.detach().relu().mean((0, 2, 3))))
        with torch.no_grad():
            model.eval()(torch.from_numpy(to_tensor_batch(b.calib.clean)))
        hook.remove()
        dead = torch.argsort(acts[0])[: int(prune * last.out_channels)]
        with torch.no_grad():
            last.weight[dead] = 0
        last.weight.register_hook(lambda g: g.index_fill(0, dead, 0))
        model.train()
    x, y = torch.from_numpy(to_tensor_batch(b.calib.clean)), torch.from_numpy(b.calib.clean_labels)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(b.cfg.seed)
    for _ in range(10):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            xb = x[idx].flip(3) if bool(torch.rand(1, generator=gen) < 0.5) else x[idx]
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    seconds = time.time() - t0
    with torch.inference_mode():
        px = np.concatenate([model(torch.from_numpy(to_tensor_batch(b.ev_images_clean[i : i + 500]))).argmax(1).numpy()
                             for i in range(0, len(b.ev_images_clean), 500)])  # fmt: skip
        pt = np.concatenate([model(torch.from_numpy(to_tensor_batch(b.ev_images_trig[i : i + 500]))).argmax(1).numpy()
                             for i in range(0, len(b.ev_images_trig), 500)])  # fmt: skip
    label = f"fine-pruning ({prune:.0%} pruned)" if prune else "fine-tuning"
    return {"defense": f"{label} on 1,000 clean ({seconds:.0f} s)", **b.metrics(px, pt)}


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
            measured += [*_given_more(b), _strip(b), _fine_tune(b, 0.0), _fine_tune(b, 0.3)]
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
