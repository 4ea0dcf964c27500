"""``fire bench own-model``: FIRE on models this project did not make, through the server.

1. A torchvision MobileNetV3-Small trained elsewhere with a BadNets backdoor (``train_torchvision.py``),
   handed to FIRE only as files: its ONNX export and its TorchScript file. Each is protected with
   ``serving.protect`` (the cut chosen from the calibration images), with flagged triggered images (no
   labels, unpaired) and, for the ONNX file, also with the trigger known (paired). CA / ASR / PA are
   measured through Triton on the CIFAR-10 test split, protected vs the original model.
2. Foreign test cases (``foreign.py``): a third party's two-class network at 32 x 64 with dynamic H/W,
   BGR and its own normalisation, fine-tuned with a checker patch and with a blend backdoor; protected
   by ``fire protect``'s path from 400 clean and 50 flagged images, the cut chosen automatically.
3. A ResNet-18 at 3x224x224 (random weights), cut after layer2: split error, served == original with an
   identity repair, and the serving latency of FIRE vs the unsplit model at batch 1 and 32.

Writes results/own_model.md and results/own_model.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration.calibrate import CalibrationConfig, CalibrationSet
from calibration.cutsearch import admitting_bound, held_back
from clients import FireClient, evaluate_served
from fire_backend.names import INPUT, LOGITS, PROJECT_ROOT, SUFFIXES, WHOLE_ONNX
from modelio.onnx_graph import OnnxGraph
from modelio.preprocess import Preprocess
from modelio.sources import load_torch_model, torchscript_to_onnx
from serving.protect import ProtectConfig, ProtectResult, protect_onnx
from serving.server import ServerConfig, TritonServer
from zoo.attacks import attack_from_spec
from zoo.data import load_dataset
from zoo.metrics import BackdoorMetrics


@dataclass
class OwnModelConfig:
    model_dir: Path = PROJECT_ROOT / "models" / "own_mobilenet_v3_small"
    n_clean: int = 1000
    n_poisoned: int = 200
    test_limit: int = 0  # 0: the whole CIFAR-10 test split
    latency_requests: int = 60  # per model and batch size, 224x224
    batch_sizes: tuple[int, ...] = (1, 32)
    work_dir: Path = PROJECT_ROOT / "build" / "own_model"
    out: Path = PROJECT_ROOT / "results" / "own_model.md"
    seed: int = 0
    foreign_clean: int = 400  # the foreign cases: clean calibration images (labeled)
    foreign_flagged: int = 50  # and flagged triggered ones
    rows: dict = field(default_factory=dict)

    @classmethod
    def quick(cls) -> OwnModelConfig:
        return cls(n_clean=300, n_poisoned=60, test_limit=500, latency_requests=5, batch_sizes=(1, 4))


def _data(train, attack, cfg: OwnModelConfig) -> tuple[CalibrationSet, CalibrationSet]:
    """Flagged (unpaired: triggered images without originals or labels) and paired, from the training split."""
    paired = CalibrationSet.with_trigger(train.images, attack, cfg.n_poisoned, cfg.n_clean, train.labels, cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    others = rng.choice(np.flatnonzero(attack.counts_for_asr(train.labels)), cfg.n_poisoned, replace=False)
    flagged = CalibrationSet(paired.clean, attack.apply(train.images[others]), clean_labels=paired.clean_labels,
                             provenance={"flagged": "triggered training images, no originals, no labels"})  # fmt: skip
    return flagged, paired


def _protect(name: str, onnx_path: Path, pre: Preprocess, data: CalibrationSet, cfg: OwnModelConfig,
             repo: Path, whole: bool = False) -> ProtectResult:  # fmt: skip
    pc = ProtectConfig(name, repo, cfg.work_dir, calibration=CalibrationConfig(seed=cfg.seed), whole=whole)
    return protect_onnx(onnx_path, pre, data, pc)


def _efficacy(cfg: OwnModelConfig) -> tuple[dict[str, BackdoorMetrics], dict[str, ProtectResult], dict]:
    meta = json.loads((cfg.model_dir / "train.json").read_text())
    p = meta["preprocess"]
    pre = Preprocess(32, 32, divisor=p["divisor"], mean=tuple(p["mean"]), std=tuple(p["std"]))
    attack = attack_from_spec(meta["attack"])
    flagged, paired = _data(load_dataset("cifar10", "train"), attack, cfg)
    repo = cfg.work_dir / "repository"
    onnx_file = cfg.model_dir / WHOLE_ONNX
    import torch

    ts = load_torch_model(str(cfg.model_dir / "model.torchscript.pt"))
    ts_onnx = torchscript_to_onnx(ts, torch.from_numpy(pre.apply(flagged.clean[:2])), cfg.work_dir / "torchscript.onnx")
    results = {
        "own_onnx": _protect("own_onnx", onnx_file, pre, flagged, cfg, repo, whole=True),
        "own_onnx_paired": _protect("own_onnx_paired", onnx_file, pre, paired, cfg, repo),
        "own_torch": _protect("own_torch", ts_onnx, pre, flagged, cfg, repo),
    }
    graph = OnnxGraph(onnx_file)
    metrics = {}
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        io = (graph.input.name, graph.output.name)
        for model in ("own_onnx_whole", "own_onnx", "own_onnx_paired"):
            metrics |= evaluate_served(server.grpc_url, [model], "cifar10", attack, limit=cfg.test_limit,
                                       preprocess=pre, io=io)  # fmt: skip
        metrics |= evaluate_served(server.grpc_url, ["own_torch"], "cifar10", attack, limit=cfg.test_limit,
                                   preprocess=pre, io=(INPUT, LOGITS))  # fmt: skip
    return metrics, results, meta


def _foreign(cfg: OwnModelConfig) -> list[dict]:
    """Each foreign case (built if missing), protected from 400 clean and 50 flagged images with the cut
    chosen automatically, then measured through the server beside the original."""
    from benchmarks.own_model.foreign import MEAN, STD, build_case, cases, pairs

    work = cfg.work_dir / "foreign"
    pre = Preprocess(32, 64, channels="BGR", mean=MEAN, std=STD)
    train_x, train_y = pairs("train", cfg.seed)
    test_x, test_y = pairs("test", cfg.seed)
    if cfg.test_limit:
        test_x, test_y = test_x[: cfg.test_limit], test_y[: cfg.test_limit]
    test = (test_x, test_y)
    rng = np.random.default_rng(cfg.seed + 7)
    rows = []
    for case in cases(work):
        onnx_file = work / case.name / WHOLE_ONNX
        meta = json.loads((work / case.name / "case.json").read_text()) if onnx_file.is_file() else \
            build_case(case, work / case.name, base=work / "clean_base.pt")  # fmt: skip
        attack = attack_from_spec(case.attack)
        clean_idx = rng.choice(len(train_x), cfg.foreign_clean, replace=False)
        flag_idx = rng.choice(np.flatnonzero(train_y != attack.target), cfg.foreign_flagged, replace=False)
        data = CalibrationSet(train_x[clean_idx], attack.apply(train_x[flag_idx]), clean_labels=train_y[clean_idx])
        default = ProtectConfig.max_ca_drop
        r, m = _protect_foreign(case.name, onnx_file, pre, data, work, default, test, attack, whole=True)
        served = [("original", m[case.name + SUFFIXES["whole"]], r), ("FIRE", m[case.name], r)]
        stronger = held_back(r.chosen, r.cut_scores, default) if r.chosen else None
        if stronger:  # what a user does on fire protect's warning: the bound it names
            bound = admitting_bound(stronger)
            r2, m2 = _protect_foreign(case.name, onnx_file, pre, data, work, bound, test, attack, whole=False)
            served.append((f"FIRE, --max-ca-drop {bound:.2f}", m2[case.name], r2))
        for label, metrics, result in served:
            rows.append({"case": case.name, "served": label, "CA": 100 * metrics.ca, "ASR": 100 * metrics.asr,
                         "PA": 100 * metrics.pa, "cut": result.export.layer,
                         "features": tuple(result.export.feature_shape), "alpha": result.directions.alpha,
                         "train_CA": 100 * meta["CA"], "train_ASR": 100 * meta["ASR"]})  # fmt: skip
    return rows


def _protect_foreign(name: str, onnx_file: Path, pre: Preprocess, data: CalibrationSet, work: Path,
                     max_ca_drop: float, test: tuple[np.ndarray, np.ndarray], attack, whole: bool):  # fmt: skip
    """``fire protect``'s path for one foreign case at ``max_ca_drop``, measured through the server on the
    test pairs (and the original beside it when ``whole``): (the protect result, metrics per served model)."""
    from calibration.imagesets import ImageSet
    from clients import evaluate_images

    repo = work / f"repository_{name}"
    r = protect_onnx(onnx_file, pre, data, ProtectConfig(name, repo, work / "exports", whole=whole,
                                                         max_ca_drop=max_ca_drop))  # fmt: skip
    x, y = test
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        models = [name + SUFFIXES["whole"], name] if whole else [name]
        m = evaluate_images(server.grpc_url, models, ImageSet(x, y), ImageSet(attack.apply(x), y), attack.target, pre)
    return r, m


def _cut_cell(row: dict) -> str:
    return f"`{row['cut']}` {row['features']} x{row['alpha']:g}"


def _latency(cfg: OwnModelConfig) -> tuple[list[dict], ProtectResult]:
    """p50 / p99 of FIRE (ensemble) and the unsplit model at 224x224, one closed-loop client, interleaved."""
    from benchmarks.own_model.large import large_onnx
    from zoo.attacks import make_attack

    path = large_onnx(cfg.work_dir / "resnet18_224.onnx", input_name="pixel_values", output_name="logits")
    graph = OnnxGraph(path)
    cut = [c.tensor for c in graph.cuts() if c.dims[1:] == (128, 28, 28)][-1]  # after layer2 (its last block)
    pre = Preprocess(224, 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    rng = np.random.default_rng(cfg.seed)
    images = rng.integers(0, 256, (48, 224, 224, 3), dtype=np.uint8)
    data = CalibrationSet.with_trigger(images, make_attack("badnets"), n_poisoned=16, n_clean=32)
    repo = cfg.work_dir / "repository224"
    r = protect_onnx(path, pre, data, ProtectConfig("r18", repo, cfg.work_dir, cut=cut, whole=True))
    rows = []
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        client = FireClient(server.grpc_url, max_batch_size=64)
        for batch in cfg.batch_sizes:
            x = pre.apply(rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8))
            times: dict[str, list[float]] = {"r18": [], "r18_whole": []}
            for model in times:  # warm-up
                client.infer(model, x, "pixel_values", "logits")
            for _ in range(cfg.latency_requests):
                for model in times:
                    t0 = time.perf_counter()
                    client.infer(model, x, "pixel_values", "logits")
                    times[model].append(1000 * (time.perf_counter() - t0))
            for model, ts in times.items():
                p50, p99 = (float(np.percentile(ts, q)) for q in (50, 99))
                rows.append({"model": model, "batch": batch, "p50_ms": p50, "p99_ms": p99,
                             "img_s": batch * 1000 / float(np.mean(ts))})  # fmt: skip
    return rows, r


def _plot(metrics: dict[str, BackdoorMetrics], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(metrics)
    xs = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for k, (key, label) in enumerate((("ca", "CA"), ("asr", "ASR"), ("pa", "PA"))):
        ax.bar(xs + (k - 1) * 0.27, [100 * getattr(metrics[n], key) for n in names], 0.27, label=label)
    ax.set_xticks(xs, names, fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(ncol=3)
    ax.set_title("torchvision MobileNetV3-Small (BadNets), through Triton")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_own_model(cfg: OwnModelConfig | None = None) -> Path:
    cfg = cfg or OwnModelConfig()
    t0 = time.time()
    metrics, results, meta = _efficacy(cfg)
    foreign = _foreign(cfg)
    latency, big = _latency(cfg)
    label = {
        "own_onnx_whole": "original (no defense)",
        "own_onnx": "FIRE, from model.onnx, flagged images (unpaired)",
        "own_onnx_paired": "FIRE, from model.onnx, trigger known (paired)",
        "own_torch": "FIRE, from model.torchscript.pt, flagged images (unpaired)",
    }
    lines = [
        "# FIRE on a model it did not make",
        "",
        f"`fire bench own-model` ({time.time() - t0:.0f} s on this machine, 2 cores, CPU profile). The model: "
        f"{meta['architecture']}, trained with a plain torch loop in a separate torch {meta['torch']} / "
        f"torchvision {meta['torchvision']} environment (`benchmarks/own_model/train_torchvision.py`), BadNets "
        f"(3x3 patch, target 0, 10 %); FIRE saw only `model.onnx` and `model.torchscript.pt`. Preprocessing "
        f"declared: mean {tuple(meta['preprocess']['mean'])}, std {tuple(meta['preprocess']['std'])}. Calibration: "
        f"{cfg.n_clean} clean and {cfg.n_poisoned} triggered CIFAR-10 training images; evaluation: the CIFAR-10 "
        f"test split{f' (seeded subset of {cfg.test_limit})' if cfg.test_limit else ''}, through Triton over gRPC.",
        "",
        "| served model | CA % | ASR % | PA % | cut (chosen from the calibration images) | head->tail error |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, m in metrics.items():
        r = results.get(name)
        cut = f"`{r.export.layer}` {tuple(r.export.feature_shape)}" if r else "-"
        err = f"{r.export.split_max_abs_err:.1e}" if r else "-"
        lines.append(f"| {label[name]} (`{name}`) | {100 * m.ca:.2f} | {100 * m.asr:.2f} | {100 * m.pa:.2f} | "
                     f"{cut} | {err} |")  # fmt: skip
    lines += [
        "",
        f"Training-time test metrics of the model (torch): CA {100 * meta['test']['CA']:.2f}, "
        f"ASR {100 * meta['test']['ASR']:.2f}, PA {100 * meta['test']['PA']:.2f}.",
        "",
        "## Foreign models: two classes, 32 x 64, dynamic H/W, BGR, its own normalisation",
        "",
        "A third party's network (`benchmarks/own_model/foreign.py`: its recipe) for CIFAR-10 vehicles vs animals, "
        "two images side by side (32 x 64), 60 % animals (the attacker's class), BGR normalised to [-1, 1], "
        "exported to ONNX with dynamic H and W, a data-dependent Reshape, and tensor names `x` / "
        "`save_infer_model/scale_0.tmp_1`; fine-tuned with a 6x6 checker patch (`checker`) or a 15 % noise blend "
        f"(`blend`). FIRE: `fire protect`'s path from {cfg.foreign_clean} clean and {cfg.foreign_flagged} flagged "
        "training images, the cut chosen automatically; measured through Triton on the test pairs. Targets: "
        "ASR <= 5, PA >= CA - 5, CA drop <= 0.5. Where `fire protect` warns that the cost bound held a "
        "stronger repair back, the case is protected again with the `--max-ca-drop` the warning names (a row "
        "of its own).",
        "",
        "| case | served | CA % | ASR % | PA % | cut chosen, strength |",
        "|---|---|---:|---:|---:|---|",
        *(
            f"| {r['case']} | {r['served']} | {r['CA']:.2f} | {r['ASR']:.2f} | {r['PA']:.2f} | "
            f"{_cut_cell(r) if r['served'] != 'original' else ''} |"
            for r in foreign
        ),
        "",
        "## 3x224x224: ResNet-18 (random weights), cut after layer2",
        "",
        f"Cut `{big.export.layer}`, features {tuple(big.export.feature_shape)}; head -> tail vs the original "
        f"(onnxruntime): max abs error {big.export.split_max_abs_err:.1e}. Served latency, one gRPC client, "
        f"{cfg.latency_requests} requests per model and batch size, interleaved (`r18` = FIRE ensemble "
        "head -> repair -> tail, `r18_whole` = the unsplit model, both Python-backend onnxruntime, 1 thread):",
        "",
        "| model | batch | p50 ms | p99 ms | images/s |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| `{r['model']}` | {r['batch']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['img_s']:.1f} |"
            for r in latency
        ),  # fmt: skip
        "",
        "Command: `fire bench own-model` (retrain the model: `bash scripts/torchvision_env.sh` then "
        "`PYTHONPATH=. .venv-torchvision/bin/python -m benchmarks.own_model.train_torchvision "
        "--out models/own_mobilenet_v3_small`).",
        "",
    ]
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text("\n".join(lines))
    _plot(metrics, cfg.out.with_suffix(".png"))
    return cfg.out
