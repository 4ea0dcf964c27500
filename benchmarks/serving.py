"""Serving benchmark: what FIRE costs at serving time, measured side by side on one server.

In one run, on one tritonserver, for every batch size x concurrency cell, the models are measured in
interleaved windows (round-robin, order rotated each round) so drift hits all of them alike:

  whole        the unsplit model as one model (unprotected baseline)
  plain        ensemble head -> tail
  fire_<mode>  ensemble head -> repair -> tail, each repair mode
  fused        head -> repair -> tail folded into one ONNX graph

Closed loop: ``concurrency`` client threads, each with its own connection, send back-to-back requests
of ``batch`` real CIFAR-10 test images. Reported: images/s, p50/p95/p99 latency, ratios, and per-step
queue and compute times from Triton's statistics API; the repair core is also timed in-process.

    python -m benchmarks.serving            # or: fire bench serving
writes results/serving.csv, results/serving.md and results/serving.png.
"""

from __future__ import annotations

import csv
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from calibration import CalibrationConfig, calibrate
from fire_backend.directions import DirectionFile
from fire_backend.errors import StepFailedError
from fire_backend.formula import NumpyRepair
from fire_backend.names import ADMIN_HEADER, DIRECTIONS_FILE, PROJECT_ROOT, ModelNames
from fire_backend.repair import Repair
from modelio.export import ExportInfo, export_split
from serving.configs import ServingSettings
from serving.repository import ProtectedModel, Variant, build_repository
from serving.server import STUB_SHM_BYTES, ServerConfig, TritonServer
from zoo.data import load_dataset, to_tensor_batch

MODES = ("project", "subtract", "gated")
SHM_BYTES = STUB_SHM_BYTES  # the server default: a batch of 64 activations fits without growing


@dataclass
class ServingBenchConfig:
    model_dir: Path = PROJECT_ROOT / "models" / "cifar10_resnet_badnets"
    layer: str = "layer2"
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    concurrency: tuple[int, ...] = (1, 4, 16)
    window_s: float = 3.0  # one measurement window per model per round
    rounds: int = 2
    warmup_s: float = 1.0
    protocol: str = "grpc"
    profile: str = "cpu"  # "gpu": TensorRT halves and CUDA repair (GPU machine; engines built by the builder)
    settings: ServingSettings = field(default_factory=ServingSettings)
    work_dir: Path = PROJECT_ROOT / "build" / "bench"
    out_dir: Path = PROJECT_ROOT / "results"
    name: str = "serving"  # output file stem
    size: int = 32  # 32: the bundled CIFAR-10 ResNet; 224: a ResNet-18 at 3x224x224 (random weights)
    modes: tuple[str, ...] = MODES  # the FIRE ensembles measured (one per repair mode)

    @classmethod
    def quick(cls) -> ServingBenchConfig:
        """A smoke run: every code path in seconds, numbers not meant to be reported."""
        return cls(batch_sizes=(1, 8), concurrency=(1, 2), window_s=0.5, rounds=1, warmup_s=0.2, name="serving-quick")

    @classmethod
    def large(cls) -> ServingBenchConfig:
        """The 224x224 model: fewer, longer windows (a batch-32 request takes about a second here)."""
        return cls(size=224, batch_sizes=(1, 32), concurrency=(1, 4), window_s=8.0, rounds=2, warmup_s=2.0,
                   modes=("project",), name="serving_224")  # fmt: skip


def _models(name: str, modes: tuple[str, ...] = MODES) -> dict[str, str]:
    """Label -> served model name."""
    n = ModelNames(name)
    return {
        "whole": n.whole,
        "plain": n.plain,
        **{f"fire_{m}": name if m == "project" else n.variant(m) for m in modes},
        "fused": n.fused,
        "folded": n.folded,
    }


def _composing(name: str, label: str) -> list[str]:
    """The models whose statistics explain one served model's time."""
    if label in ("whole", "fused", "folded"):
        return [_models(name)[label]]
    n = ModelNames(name)
    if label == "plain":
        return [n.head, n.tail]
    mode = label.removeprefix("fire_")
    return [n.head, n.repair if mode == "project" else n.variant_repair(mode), n.tail]


def _client(url: str, protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    return tc, tc.InferenceServerClient(url=url)


def _headers(url: str, protocol: str) -> dict[str, str]:
    from clients.triton_client import inference_headers

    return inference_headers(url, protocol)


def closed_loop(
    url: str, protocol: str, model: str, batch: np.ndarray, concurrency: int, duration_s: float
) -> tuple[np.ndarray, float]:
    """Latencies (s) of every request ``concurrency`` back-to-back clients complete in about ``duration_s``,
    and the elapsed wall time."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    ready = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    from clients import FireClient

    io = FireClient(url, protocol).io(model)  # the served model's own tensor names and datatype

    def worker(i: int) -> None:
        tc, client = _client(url, protocol)
        inp = tc.InferInput(io.input, list(batch.shape), io.datatype)
        inp.set_data_from_numpy(batch)
        out = [tc.InferRequestedOutput(io.output)]
        headers = _headers(url, protocol)
        ready.wait()
        try:
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                client.infer(model, [inp], outputs=out, headers=headers)
                latencies[i].append(time.perf_counter() - t0)
        except BaseException as e:  # reported after the window: a failed request invalidates it
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    t_start = time.perf_counter()
    stop_at[0] = t_start + duration_s
    ready.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    if errors:
        raise StepFailedError(f"{model}: request failed during the benchmark: {errors[0]}")
    return np.array([x for lat in latencies for x in lat]), elapsed


def _stats(http, models: list[str], admin_key: str) -> dict[str, dict[str, float]]:
    """Cumulative (count, ns) per stat for each model, from v2/models/<m>/stats (a restricted API)."""
    out = {}
    for m in models:
        s = http.get_inference_statistics(m, headers={ADMIN_HEADER: admin_key})["model_stats"][0]
        inf = s["inference_stats"]
        out[m] = {
            "requests": float(inf["success"]["count"]),
            "executions": float(s["execution_count"]),
            "queue_ns": float(inf["queue"]["ns"]),
            "compute_ns": sum(float(inf[k]["ns"]) for k in ("compute_input", "compute_infer", "compute_output")),
            "infer_ns": float(inf["compute_infer"]["ns"]),
        }
    return out


def repair_core_timings(directions: Path, batch_sizes: tuple[int, ...], repeats: int = 500) -> dict[str, float]:
    """In-process time of one in-place repair call per mode and batch size, in us: the CPU repair model's
    NumPy form (``numpy/``) and the torch form (``torch/``, 1 thread), on features from the benchmark."""
    torch.set_num_threads(1)
    d = DirectionFile.load(directions)
    rng = np.random.default_rng(0)
    out = {}
    for mode in MODES:
        for lib, repair in (("numpy", NumpyRepair(d, mode)), ("torch", Repair(d, mode))):
            for b in batch_sizes:
                x = rng.normal(size=(b, *d.feature_shape)).astype(np.float32)
                x = torch.from_numpy(x) if lib == "torch" else x
                for _ in range(20):
                    repair(x, inplace=True)
                t0 = time.perf_counter()
                for _ in range(repeats):
                    repair(x, inplace=True)
                out[f"{lib}/{mode}/b{b}"] = (time.perf_counter() - t0) / repeats * 1e6
    return out


def _export(cfg: ServingBenchConfig, export_dir: Path) -> None:
    """The model, split and calibrated: the bundled CIFAR-10 ResNet, or the 224x224 ResNet-18."""
    directions = export_dir / DIRECTIONS_FILE
    if cfg.size == 32:
        export_split(cfg.model_dir, cfg.layer, export_dir)
        calibrate(export_dir, directions, CalibrationConfig(mode="project"))
        return
    from benchmarks.own_model.large import large_onnx
    from calibration.calibrate import CalibrationSet
    from modelio.export import export_onnx_model
    from modelio.onnx_graph import OnnxGraph
    from modelio.preprocess import Preprocess
    from zoo.attacks import make_attack

    path = large_onnx(cfg.work_dir / "resnet18_224.onnx")
    cut = [c.tensor for c in OnnxGraph(path).cuts() if c.dims[1:] == (128, 28, 28)][-1]  # after layer2
    pre = Preprocess(224, 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    images = np.random.default_rng(0).integers(0, 256, (96, 224, 224, 3), dtype=np.uint8)
    export_onnx_model(path, cut, export_dir, pre, check_images=images[:8])
    data = CalibrationSet.with_trigger(images, make_attack("badnets"), n_poisoned=32, n_clean=64)
    calibrate(export_dir, directions, CalibrationConfig(mode="project"), data)


def _inputs(cfg: ServingBenchConfig, export_dir: Path, n: int) -> np.ndarray:
    if cfg.size == 32:
        return to_tensor_batch(load_dataset("cifar10", "test").subset(n, seed=0).images)

    pre = ExportInfo.read(export_dir).preprocessing()
    return pre.apply(np.random.default_rng(1).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8))


def prepare(cfg: ServingBenchConfig) -> Path:
    """Export, calibrate and build the benchmark repository (every variant of the model)."""
    export_dir = cfg.work_dir / "export"
    _export(cfg, export_dir)
    repo = cfg.work_dir / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    variants = tuple(Variant.of_mode(m) for m in cfg.modes if m != "project")
    model = ProtectedModel("bench", export_dir, export_dir / DIRECTIONS_FILE, variants=variants, fused=True,
                           whole=True, plain=True, folded=True)  # fmt: skip
    build_repository([model], repo, cfg.settings, tensorrt=cfg.profile == "gpu")
    return repo


def run(cfg: ServingBenchConfig) -> list[dict]:
    repo = prepare(cfg)
    inputs = _inputs(cfg, cfg.work_dir / "export", max(cfg.batch_sizes))
    server_cfg = ServerConfig(
        repo,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        model_config_name=None if cfg.profile == "cpu" else cfg.profile,
    )
    labels = _models("bench", cfg.modes)
    rows = []
    with TritonServer(server_cfg) as server:
        url = server.grpc_url if cfg.protocol == "grpc" else server.http_url
        _, http = _client(server.http_url, "http")
        cells = [(b, c) for b in cfg.batch_sizes for c in cfg.concurrency]
        bar = tqdm(total=len(cells) * cfg.rounds * len(labels), desc="serving bench", unit="window", disable=None)
        for b, c in cells:
            batch = inputs[:b]
            for model in labels.values():
                closed_loop(url, cfg.protocol, model, batch, c, cfg.warmup_s)
            lat: dict[str, list[np.ndarray]] = {k: [] for k in labels}
            elapsed = dict.fromkeys(labels, 0.0)
            step_stats: dict[str, dict[str, float]] = {}
            for r in range(cfg.rounds):
                order = list(labels)[r % len(labels) :] + list(labels)[: r % len(labels)]
                for label in order:
                    composing = _composing("bench", label)
                    before = _stats(http, composing, server.admin_key)
                    latencies, seconds = closed_loop(url, cfg.protocol, labels[label], batch, c, cfg.window_s)
                    lat[label].append(latencies)
                    elapsed[label] += seconds
                    after = _stats(http, composing, server.admin_key)
                    for m in composing:
                        acc = step_stats.setdefault(f"{label}|{m}", dict.fromkeys(after[m], 0.0))
                        for k in acc:
                            acc[k] += after[m][k] - before[m][k]
                    bar.update()
            for label in labels:
                all_lat = np.concatenate(lat[label])
                row = {
                    "model": label,
                    "batch": b,
                    "concurrency": c,
                    "requests": len(all_lat),
                    "images_per_s": len(all_lat) * b / elapsed[label],
                    "p50_ms": 1e3 * np.percentile(all_lat, 50),
                    "p95_ms": 1e3 * np.percentile(all_lat, 95),
                    "p99_ms": 1e3 * np.percentile(all_lat, 99),
                }
                steps = []
                for m in _composing("bench", label):
                    s = step_stats[f"{label}|{m}"]
                    n = max(s["requests"], 1)
                    step = m.removeprefix("bench_")
                    steps.append(f"{step} q{s['queue_ns'] / n / 1e3:.0f}/c{s['compute_ns'] / n / 1e3:.0f}")
                    if "fire" in m:
                        row["repair_infer_us_per_exec"] = s["infer_ns"] / max(s["executions"], 1) / 1e3
                row["steps_queue_compute_us"] = " ".join(steps)
                rows.append(row)
        bar.close()
    return rows


def _ratio(rows: list[dict], num: str, den: str, b: int, c: int, key: str) -> float:
    get = {(r["model"], r["batch"], r["concurrency"]): r for r in rows}
    return get[(num, b, c)][key] / get[(den, b, c)][key]


def write_results(cfg: ServingBenchConfig, rows: list[dict], core: dict[str, float], wall_s: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = cfg.out_dir / f"{cfg.name}.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)

    lines = [
        f"# Serving benchmark ({cfg.profile} profile, {cfg.protocol})",
        "",
        f"One tritonserver, models measured in interleaved {cfg.window_s:g} s windows x {cfg.rounds} rounds per "
        f"cell; closed loop. Settings: {asdict(cfg.settings)}, Python-backend shm {SHM_BYTES >> 20} MiB. "
        f"Wall time {wall_s:.0f} s.",
        "",
        "| batch | conc | model | images/s | p50 ms | p95 ms | p99 ms | steps: queue/compute us per request |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['concurrency']} | {r['model']} | {r['images_per_s']:.0f} | "
            f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['steps_queue_compute_us']} |"
        )
    get = {(r["model"], r["batch"], r["concurrency"]): r for r in rows}
    lines += [
        "",
        "## Ratios and targets",
        "",
        "Targets: FIRE/plain images/s >= 0.97 at batch 8 and 32; FIRE batch-1 p50 <= plain + 0.15 ms; FIRE/plain "
        "p99 <= 1.1; folded (zero hops, hot-swappable) / whole >= 0.98 at batch 32.",
        "",
        "| batch | conc | FIRE/plain images/s | FIRE - plain p50 ms | FIRE/plain p99 | folded/whole images/s "
        "| fused/whole images/s | plain/whole images/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in cfg.batch_sizes:
        for c in cfg.concurrency:
            p50 = get[("fire_project", b, c)]["p50_ms"] - get[("plain", b, c)]["p50_ms"]
            lines.append(
                f"| {b} | {c} | {_ratio(rows, 'fire_project', 'plain', b, c, 'images_per_s'):.3f} | {p50:+.2f} | "
                f"{_ratio(rows, 'fire_project', 'plain', b, c, 'p99_ms'):.3f} | "
                f"{_ratio(rows, 'folded', 'whole', b, c, 'images_per_s'):.3f} | "
                f"{_ratio(rows, 'fused', 'whole', b, c, 'images_per_s'):.3f} | "
                f"{_ratio(rows, 'plain', 'whole', b, c, 'images_per_s'):.3f} |"
            )
    lines += [
        "",
        "## Repair core, in process, in place, 1 thread (us per call)",
        "",
        "`numpy` is the CPU repair model's form (row by row, only rows the gate selects); `torch` the GPU one.",
        "",
        "| form | mode | " + " | ".join(f"batch {b}" for b in cfg.batch_sizes) + " |",
        "|---|---|" + "---:|" * len(cfg.batch_sizes),
    ]
    for lib in ("numpy", "torch"):
        for mode in MODES:
            cells = " | ".join(f"{core[f'{lib}/{mode}/b{b}']:.1f}" for b in cfg.batch_sizes)
            lines.append(f"| {lib} | {mode} | {cells} |")
    command = "fire bench serving" + (" --size 224" if cfg.size == 224 else "")
    lines += ["", f"Command: `{command}`", ""]
    md_path = cfg.out_dir / f"{cfg.name}.md"
    md_path.write_text("\n".join(lines))

    labels = list(_models("bench", cfg.modes))
    fig, axes = plt.subplots(1, len(cfg.batch_sizes), figsize=(5 * len(cfg.batch_sizes), 4), squeeze=False)
    for ax, b in zip(axes[0], cfg.batch_sizes, strict=True):
        for label in labels:
            pts = [r for r in rows if r["model"] == label and r["batch"] == b]
            ax.plot([r["concurrency"] for r in pts], [r["images_per_s"] for r in pts], marker="o", label=label)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images/s")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"FIRE serving throughput ({cfg.profile}, {cfg.protocol})")
    fig.tight_layout()
    fig.savefig(cfg.out_dir / f"{cfg.name}.png", dpi=110)
    plt.close(fig)
    return md_path


def main(cfg: ServingBenchConfig | None = None) -> Path:
    cfg = cfg or ServingBenchConfig()
    t0 = time.time()
    rows = run(cfg)
    core = repair_core_timings(cfg.work_dir / "export" / DIRECTIONS_FILE, cfg.batch_sizes)
    path = write_results(cfg, rows, core, time.time() - t0)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
