"""Serving benchmark: what FIRE costs at serving time, measured with NVIDIA's perf_analyzer on one server.

For every batch size x concurrency cell, the models are measured in interleaved rounds (each round runs
every model once, back to back, the order rotated) so drift hits all of them alike:

  whole        the unsplit model as one model (unprotected baseline)
  plain        ensemble head -> tail
  fire_<mode>  ensemble head -> repair -> tail, each repair mode
  folded       head -> repair -> tail in one onnxruntime session, the repair's parameters as inputs
               (zero hops, hot-swappable)
  fused        the same graph with the parameters as constants (zero hops, no hot swap)

perf_analyzer (``benchmarks.perf_analyzer``) sends real CIFAR-10 test images (``--input-data``) from
``concurrency`` clients, closed loop. Reported: images/s, p50/p95/p99 latency, its server-side times,
ratios computed within a round, and per-step queue and compute times from Triton's statistics API; the
repair core is also timed in-process. Then the same at 1 and 2 instances per step.

    python -m benchmarks.serving            # or: fire bench serving
writes results/serving.csv, results/serving.md and results/serving.png.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from benchmarks import perf_analyzer
from calibration import CalibrationConfig, calibrate
from fire_backend.directions import DirectionFile
from fire_backend.formula import NumpyRepair, folded_inputs
from fire_backend.names import (
    ADMIN_HEADER,
    DIRECTIONS_FILE,
    FOLDED_INPUTS,
    FOLDED_PER_DIRECTION,
    MODEL_VERSION,
    PROJECT_ROOT,
    WHOLE_ONNX,
    ModelNames,
)
from fire_backend.onnx_runtime import onnx_session
from fire_backend.repair import Repair
from modelio.export import ExportInfo, export_split
from serving.configs import ServingSettings
from serving.repository import ProtectedModel, Variant, build_repository
from serving.server import STUB_SHM_BYTES, ServerConfig, TritonServer
from zoo.data import load_dataset, to_tensor_batch

MODES = ("project", "subtract", "gated")
SCALED = ("whole", "plain", "fire_project", "folded")  # the models of the scaling table
ZERO_HOP = ("whole", "fused", "folded")  # the one-graph models, also timed in process
PRODUCTS = "whole + the two products"  # in process: whole's time plus the repair's k x D products alone
RANK1 = "folded, rank 1"  # in process: the folded graph fed the served file's first direction only
SHM_BYTES = STUB_SHM_BYTES  # the server default: a batch of 64 activations fits without growing


@dataclass
class ServingBenchConfig:
    model_dir: Path = PROJECT_ROOT / "models" / "cifar10_resnet_badnets"
    layer: str = "layer2"
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    concurrency: tuple[int, ...] = (1, 4)
    window_s: float = 1.0  # perf_analyzer's measurement window (it measures until three windows agree)
    stability: int = 25  # ... within this many percent (its default, 10, rarely holds on two shared cores)
    window_requests: int = 0  # > 0: windows of at least this many requests instead (for slow requests)
    rounds: int = 3  # each round measures every model once, back to back; ratios are taken within a round
    protocol: str = "grpc"
    profile: str = "cpu"  # "gpu": TensorRT halves and CUDA repair (GPU machine; engines built by the builder)
    settings: ServingSettings = field(default_factory=ServingSettings)
    work_dir: Path = PROJECT_ROOT / "build" / "bench"
    out_dir: Path = PROJECT_ROOT / "results"
    name: str = "serving"  # output file stem
    size: int = 32  # 32: the bundled CIFAR-10 ResNet; 224: a ResNet-18 at 3x224x224 (random weights)
    modes: tuple[str, ...] = MODES  # the FIRE ensembles measured (one per repair mode)
    instance_counts: tuple[int, ...] = (1, 2)  # the scaling table: instances per step
    scaling_cells: tuple[tuple[int, int], ...] = ((8, 4), (32, 4))  # ... at these (batch, clients)
    scaled: tuple[str, ...] = SCALED  # ... of these models

    @classmethod
    def quick(cls) -> ServingBenchConfig:
        """A smoke run: every code path in seconds, numbers not meant to be reported."""
        return cls(batch_sizes=(1, 8), concurrency=(1, 2), window_s=0.5, rounds=1, stability=50,
                   scaling_cells=((8, 2),), name="serving-quick")  # fmt: skip

    @classmethod
    def large(cls) -> ServingBenchConfig:
        """The 224x224 model: batches of 1 and 8 (a batch-8 request takes ~0.3 s here, a batch of 32 over
        a second), in windows of at least 12 requests (a time window would hold too few to agree)."""
        return cls(size=224, batch_sizes=(1, 8), concurrency=(1, 4), window_s=4.0, window_requests=12, rounds=2,
                   scaling_cells=((8, 4),), modes=("project",), name="serving_224")  # fmt: skip


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


def _http(url: str):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url=url)


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


def _products(flat: np.ndarray, r: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The repair's two k x D products alone (NumPy's BLAS, no graph around them): the scores along the
    readout ``r``, the move along the directions ``v``."""
    return (flat @ r.T) @ v


def _first_direction(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The folded graph's inputs for the same repair at rank 1 (its first direction): the graph's ops,
    copies and dispatch with almost none of the rank's arithmetic."""
    return {k: v[:1] if k in FOLDED_PER_DIRECTION else v for k, v in feed.items()}


def graph_timings(cfg: ServingBenchConfig, inputs: np.ndarray, repeats: int = 5) -> dict[str, float]:
    """In-process time of one onnxruntime call (1 thread) of the whole, fused and folded graphs the
    repository serves, per batch size, in us: what the zero-hop models cost without Triton (the folded
    graph fed the served file's parameters). Interleaved, the best of ``repeats`` timings."""
    names, repo = ModelNames("bench"), cfg.work_dir / "repo"
    feed = folded_inputs(NumpyRepair(DirectionFile.load(cfg.work_dir / "export" / DIRECTIONS_FILE)).params)
    sessions = {label: onnx_session(repo / getattr(names, label) / MODEL_VERSION / WHOLE_ONNX, 1)
                for label in ZERO_HOP}  # fmt: skip
    v = feed[FOLDED_INPUTS[0]]  # the served directions (k, D)
    out = {"rank": float(len(v))}
    for b in cfg.batch_sizes:
        images = {s.get_inputs()[0].name: inputs[:b] for s in sessions.values()}
        runs = {
            k: functools.partial(s.run, None, {**images, **(feed if k == "folded" else {})})
            for k, s in sessions.items()
        }
        runs[RANK1] = functools.partial(sessions["folded"].run, None, {**images, **_first_direction(feed)})
        runs[PRODUCTS] = functools.partial(_products, np.ones((b, v.shape[1]), np.float32), feed[FOLDED_INPUTS[5]], v)
        t0 = time.perf_counter()
        runs["whole"]()
        calls = max(1, int(0.2 / (time.perf_counter() - t0)))  # ~0.2 s per timing
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(repeats):
            for k, run_once in runs.items():
                t0 = time.perf_counter()
                for _ in range(calls):
                    run_once()
                best[k] = min(best[k], (time.perf_counter() - t0) / calls * 1e6)
        best[PRODUCTS] += best["whole"]  # the model plus the repair's arithmetic, nothing else
        out.update({f"{k}/b{b}": t for k, t in best.items()})
        if b == min(cfg.batch_sizes):
            out.update({f"{k}/cold": t for k, t in _cold(runs).items()})
    return out


FLUSH_MIB = 64  # read before every cold call: more than a core's L1 and L2 hold


def _cold(runs: dict, calls: int = 200, flush_mib: int = FLUSH_MIB) -> dict[str, float]:
    """Each of ``runs`` timed with ``flush_mib`` MiB read (one float per cache line) before every call:
    more than a core's own caches (L1, L2) hold, so each call starts with the weights and the repair's
    basis out of them, as in a server whose other processes run on the same cores between two requests
    (a large shared L3 may still hold them). Read, not written, so no dirty line is left for the timed
    call to write back. Median us per call, interleaved."""
    junk = np.ones(flush_mib * 2**20 // 4, np.float32)
    times = {k: [] for k in runs}
    for _ in range(calls):
        for k, run_once in runs.items():
            junk[::16].sum()
            t0 = time.perf_counter()
            run_once()
            times[k].append(time.perf_counter() - t0)
    out = {k: float(np.median(t)) * 1e6 for k, t in times.items()}
    out[PRODUCTS] += out["whole"]
    return out


def prepare(cfg: ServingBenchConfig, settings: ServingSettings | None = None) -> Path:
    """The benchmark repository (every variant of the model exported by ``_export``) with ``settings``."""
    export_dir = cfg.work_dir / "export"
    repo = cfg.work_dir / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    variants = tuple(Variant.of_mode(m) for m in cfg.modes if m != "project")
    model = ProtectedModel("bench", export_dir, export_dir / DIRECTIONS_FILE, variants=variants, fused=True,
                           whole=True, plain=True, folded=True)  # fmt: skip
    build_repository([model], repo, settings or cfg.settings, tensorrt=cfg.profile == "gpu")
    return repo


def run(cfg: ServingBenchConfig, settings: ServingSettings | None = None, labels: list[str] | None = None,
        cells: list[tuple[int, int]] | None = None) -> list[dict]:  # fmt: skip
    """Measure ``labels`` (default: every model) in ``cells`` (batch, clients; default: every one) on a
    server of a repository built with ``settings``."""
    settings = settings or cfg.settings
    served = {k: v for k, v in _models("bench", cfg.modes).items() if labels is None or k in labels}
    cells = cells or [(b, c) for b in cfg.batch_sizes for c in cfg.concurrency]
    repo = prepare(cfg, settings)
    inputs = _inputs(cfg, cfg.work_dir / "export", max(b for b, _ in cells))
    server_cfg = ServerConfig(
        repo,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        model_config_name=None if cfg.profile == "cpu" else cfg.profile,
        model_control="explicit",  # only the measured models (and their steps): a scaling run starts in seconds
        load_models=list(served.values()),
    )
    perf_analyzer.version()  # installed and starts, before the server does
    rows = []
    with TritonServer(server_cfg) as server, contextlib.ExitStack() as stack:
        from clients import FireClient

        url = (server.grpc_url if cfg.protocol == "grpc" else server.http_url).split("://")[-1]
        # closed before the server stops: an open keep-alive connection holds tritonserver's shutdown for its
        # whole 30 s exit timeout
        http = stack.enter_context(contextlib.closing(_http(server.http_url)))
        io = FireClient(server.grpc_url).io(next(iter(served.values())))  # the served models' input name (one for all)
        data = perf_analyzer.input_data(cfg.work_dir / "input_data.json", io.input, inputs)
        bar = tqdm(total=len(cells) * cfg.rounds * len(served), desc=f"serving bench, {settings.instances} instance(s)",
                   unit="run", disable=None)  # fmt: skip
        for b, c in cells:
            runs: dict[str, list[perf_analyzer.Measurement]] = {k: [] for k in served}
            step_stats: dict[str, dict[str, float]] = {}
            for r in range(cfg.rounds):  # interleaved: each round measures every model, the order rotated
                order = list(served)[r % len(served) :] + list(served)[: r % len(served)]
                for label in order:
                    composing = _composing("bench", label)
                    before = _stats(http, composing, server.admin_key)
                    runs[label].append(_measure(cfg, url, served[label], data, b, c, server))
                    after = _stats(http, composing, server.admin_key)
                    for m in composing:
                        acc = step_stats.setdefault(f"{label}|{m}", dict.fromkeys(after[m], 0.0))
                        for k in acc:
                            acc[k] += after[m][k] - before[m][k]
                    bar.update()
            rows += [_row(label, b, c, settings, runs[label], step_stats) for label in served]
        bar.close()
    return rows


def _measure(cfg: ServingBenchConfig, url: str, model: str, data: Path, b: int, c: int, server,
             attempts: int = 3) -> perf_analyzer.Measurement:  # fmt: skip
    """One perf_analyzer measurement, tried again when it fails to settle or to keep its load on these two
    shared cores (it reports rather than measures then); the last failure is raised."""

    def once() -> perf_analyzer.Measurement:
        return perf_analyzer.measure(url, model, data, b, c, cfg.window_s, cfg.protocol, server.inference_key,
                                     server.admin_key, stability=cfg.stability,
                                     window_requests=cfg.window_requests)  # fmt: skip

    for _ in range(attempts - 1):
        try:
            return once()
        except perf_analyzer.PerfAnalyzerError as e:
            tqdm.write(f"{e}; measuring again")
    return once()


def _row(label: str, b: int, c: int, settings: ServingSettings, ms: list, step_stats: dict) -> dict:
    row = {"model": label, "batch": b, "concurrency": c, "instances": settings.instances, "rounds": len(ms)}
    row["images_per_s"] = float(np.mean([m.images_per_s for m in ms]))
    for key in ("p50_ms", "p95_ms", "p99_ms", "server_queue_us", "server_compute_us"):
        row[key] = float(np.median([getattr(m, key) for m in ms]))
    row["rounds_images_per_s"] = " ".join(f"{m.images_per_s:.0f}" for m in ms)
    steps, row["steps_compute_us"] = [], 0.0
    for m in _composing("bench", label):
        s = step_stats[f"{label}|{m}"]
        n = max(s["requests"], 1)
        steps.append(f"{m.removeprefix('bench_')} q{s['queue_ns'] / n / 1e3:.0f}/c{s['compute_ns'] / n / 1e3:.0f}")
        row["steps_compute_us"] += s["compute_ns"] / n / 1e3
        if "fire" in m:
            row["repair_infer_us_per_exec"] = s["infer_ns"] / max(s["executions"], 1) / 1e3
            row["repair_compute_us"] = s["compute_ns"] / n / 1e3
    row["steps_queue_compute_us"] = " ".join(steps)
    return row


def _round_ratios(rows: list[dict], num: str, den: str, b: int, c: int) -> list[float]:
    """images/s ratio computed within each round (the two ran back to back)."""
    get = {(r["model"], r["batch"], r["concurrency"]): r for r in rows}
    a = [float(x) for x in get[(num, b, c)]["rounds_images_per_s"].split()]
    d = [float(x) for x in get[(den, b, c)]["rounds_images_per_s"].split()]
    return [x / y for x, y in zip(a, d, strict=True)]


def _round_ratio(rows: list[dict], num: str, den: str, b: int, c: int) -> float:
    """The rounds' ratios averaged."""
    return float(np.mean(_round_ratios(rows, num, den, b, c)))


def _ratio_target(rows: list[dict], label: str, num: str, den: str, b: int, c: int, target: float) -> str:
    """``label`` (``num/den``) images/s >= ``target``: the mean of the rounds, met or missed, and each
    round's ratio (how far a run's noise reaches)."""
    each = _round_ratios(rows, num, den, b, c)
    mean = float(np.mean(each))
    return (f"{label} images/s >= {target} at batch {b}, {c} client(s): {mean:.3f} "
            f"{'met' if mean >= target else 'MISSED'} (rounds: {', '.join(f'{r:.3f}' for r in each)})")  # fmt: skip


def _targets(cfg: ServingBenchConfig, rows: list[dict], core: dict[str, float]) -> list[str]:
    """The issue's targets, each with its measurement and met / missed; each FIRE/plain one at 1 client with
    the ratio its per-step times predict (``_step_prediction``)."""
    get = {(r["model"], r["batch"], r["concurrency"]): r for r in rows}
    out = []
    for b in cfg.batch_sizes:
        for c in cfg.concurrency:
            out.append(_ratio_target(rows, "folded/whole", "folded", "whole", b, c, 0.97))
    if 1 in cfg.batch_sizes:
        for c in cfg.concurrency:
            d = get[("folded", 1, c)]["p50_ms"] - get[("whole", 1, c)]["p50_ms"]
            out.append(f"folded batch-1 p50 <= whole + 0.05 ms, {c} client(s): {d:+.3f} ms "
                       f"{'met' if d <= 0.05 else 'MISSED'}")  # fmt: skip
    for b in (b for b in cfg.batch_sizes if b >= 8):
        for c in cfg.concurrency:
            line = _ratio_target(rows, "FIRE/plain", "fire_project", "plain", b, c, 0.95)
            if c == 1:
                line += _step_prediction(get[("plain", b, c)], get[("fire_project", b, c)], core[f"numpy/project/b{b}"])
            out.append(line)
    return out


def _step_prediction(plain: dict, fire: dict, core_us: float) -> str:
    """The FIRE/plain ratio the steps' compute times predict with one client, whose requests run the steps
    one after another, ignoring the time outside the steps' compute (queues, transport, the client): plain's
    head + tail compute per request over FIRE's head + repair + tail; and the repair step split into the
    repair itself (the NumPy core, timed warm in process on random features) and the rest (the request's
    tensors to and from the Python stub, the checks, the metrics, and any cache difference from the warm
    timing). With more clients the steps of different requests overlap and share the cores, and a step's
    compute time includes that sharing: no prediction."""
    predicted = plain["steps_compute_us"] / fire["steps_compute_us"]
    step = fire["repair_compute_us"]
    return (
        f"; per-step compute predicts {predicted:.3f} (head + tail {plain['steps_compute_us']:.0f} us per request "
        f"in plain, {fire['steps_compute_us']:.0f} with the repair step's {step:.0f} us: the repair itself "
        f"{core_us:.0f} us in process, the rest {step - core_us:.0f})"
    )


def write_results(cfg: ServingBenchConfig, rows: list[dict], scaled: list[dict], core: dict[str, float],
                  wall_s: float) -> Path:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = cfg.out_dir / f"{cfg.name}.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows + scaled for k in r)))
        w.writeheader()
        w.writerows(rows + scaled)

    labels = list(_models("bench", cfg.modes))
    get = {(r["model"], r["batch"], r["concurrency"]): r for r in rows}
    windows = f"windows of at least {cfg.window_requests} requests" if cfg.window_requests else \
        f"{cfg.window_s:g} s windows"  # fmt: skip
    pixels = "real CIFAR-10 test pixels" if cfg.size == 32 else "random pixels (the model has random weights)"
    lines = [
        f"# Serving benchmark ({cfg.profile} profile, {cfg.protocol}, NVIDIA perf_analyzer {perf_analyzer.VERSION})",
        "",
        f"One tritonserver; perf_analyzer per model and cell ({windows} until three agree within "
        f"{cfg.stability} %), {cfg.rounds} interleaved rounds, {pixels} "
        f"(`--input-data`). Settings: {asdict(cfg.settings)}, Python-backend shm {SHM_BYTES >> 20} MiB. "
        f"Wall time {wall_s:.0f} s. images/s: mean over rounds; p50: median of the rounds' p50 (ms); "
        "ratios: within each round, then averaged.",
        "",
        "| batch, clients | " + " | ".join(labels) + " | FIRE/plain | FIRE/whole | folded/whole | fused/whole |",
        "|---|" + "---:|" * (len(labels) + 4),
    ]
    for b in cfg.batch_sizes:
        for c in cfg.concurrency:
            cells = " | ".join(f"{get[(k, b, c)]['images_per_s']:.0f} ({get[(k, b, c)]['p50_ms']:.2f})" for k in labels)
            ratios = [("fire_project", "plain"), ("fire_project", "whole"), ("folded", "whole"), ("fused", "whole")]
            lines.append(f"| {b}, {c} | {cells} | " + " | ".join(f"{_round_ratio(rows, n, d, b, c):.3f}"
                                                            for n, d in ratios) + " |")  # fmt: skip
    lines += ["", "## Targets", ""] + [f"- {t}" for t in _targets(cfg, rows, core)]
    lines += [
        "",
        "## Latency and per-step times",
        "",
        "Server queue/compute: perf_analyzer's server-side times per request (us). Steps: Triton's statistics "
        "per composing model, queue/compute us per request.",
        "",
        "| batch | clients | model | p95 ms | p99 ms | server queue / compute us | steps |",
        "|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['concurrency']} | {r['model']} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['server_queue_us']:.0f} / {r['server_compute_us']:.0f} | {r['steps_queue_compute_us']} |"
        )
    if scaled:
        lines += [
            "",
            "## Instances per step (Triton instance_group count)",
            "",
            "`--instances N` on every step but the repair, which keeps `--repair-instances 1`; "
            "images/s (p50 ms). One server per count.",
            "",
            "| instances | batch, clients | " + " | ".join(cfg.scaled) + " |",
            "|---:|---|" + "---:|" * len(cfg.scaled),
        ]
        sget = {(r["instances"], r["model"], r["batch"], r["concurrency"]): r for r in scaled}
        for n in cfg.instance_counts:
            for b, c in cfg.scaling_cells:
                cells = " | ".join(f"{sget[(n, k, b, c)]['images_per_s']:.0f} ({sget[(n, k, b, c)]['p50_ms']:.2f})"
                                   for k in cfg.scaled)  # fmt: skip
                lines.append(f"| {n} | {b}, {c} | {cells} |")
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
    lines += [
        "",
        "## The zero-hop graphs, in process, 1 thread (us per onnxruntime call)",
        "",
        "The same ONNX files the server runs, without Triton: what `folded` and `fused` add to `whole` is the "
        f"repair's own graph ops (the two k x D products of the served file's rank-{core['rank']:.0f} repair, "
        "D the feature size), the floor under the served ratios above. The last row adds to `whole` only "
        "those two products, timed with NumPy's BLAS outside any graph: what the repair's arithmetic alone "
        f"costs at this rank and cut, with no graph op, copy or dispatch around it. `{RANK1}` is the folded graph "
        "fed only the file's first direction: what the graph costs with almost none of the rank's arithmetic "
        "(its own ops: the layout reorders onnxruntime's optimized graph puts around the flattened joint, the "
        "subtraction's pass over the features, the small ops; their shares not timed one by one). Cold: batch "
        f"{min(cfg.batch_sizes)} with {FLUSH_MIB} MiB read before every call (median): more than a core's own caches "
        "(L1, L2) hold, so each call starts with the weights and the repair's basis out of them, as in a server "
        "whose other processes run on the same cores between two requests.",
        "",
        "| graph | " + " | ".join(f"batch {b}" for b in cfg.batch_sizes) + " | "
        + " | ".join(f"/ whole, batch {b}" for b in cfg.batch_sizes)
        + f" | batch {min(cfg.batch_sizes)}, cold | / whole, cold |",
        "|---|" + "---:|" * (2 * len(cfg.batch_sizes) + 2),
    ]  # fmt: skip
    for k in (*ZERO_HOP, RANK1, PRODUCTS):
        cells = [f"{core[f'{k}/b{b}']:.0f}" for b in cfg.batch_sizes]
        cells += [f"{core[f'whole/b{b}'] / core[f'{k}/b{b}']:.3f}" for b in cfg.batch_sizes]
        cells += [f"{core[f'{k}/cold']:.0f}", f"{core['whole/cold'] / core[f'{k}/cold']:.3f}"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    command = "fire bench serving" + (" --size 224" if cfg.size == 224 else "")
    lines += ["", f"Command: `{command}`", ""]
    md_path = cfg.out_dir / f"{cfg.name}.md"
    md_path.write_text("\n".join(lines))

    fig, axes = plt.subplots(1, len(cfg.batch_sizes), figsize=(5 * len(cfg.batch_sizes), 4), squeeze=False)
    for ax, b in zip(axes[0], cfg.batch_sizes, strict=True):
        for label in labels:
            pts = [r for r in rows if r["model"] == label and r["batch"] == b]
            ax.plot([r["concurrency"] for r in pts], [r["images_per_s"] for r in pts], marker="o", label=label)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images/s (perf_analyzer)")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"FIRE serving throughput ({cfg.profile}, {cfg.protocol})")
    fig.tight_layout()
    fig.savefig(cfg.out_dir / f"{cfg.name}.png", dpi=110)
    plt.close(fig)
    return md_path


def scaling(cfg: ServingBenchConfig) -> list[dict]:
    """Triton's own way to use more cores: the instance_group count per step, 1 and 2 (``--instances``),
    the repair step kept at one instance (``--repair-instances 1``: it takes microseconds)."""
    rows = []
    for n in cfg.instance_counts:
        settings = dataclasses.replace(cfg.settings, instances=n, repair_instances=1)
        rows += run(cfg, settings, labels=list(cfg.scaled), cells=list(cfg.scaling_cells))
    return rows


def main(cfg: ServingBenchConfig | None = None) -> Path:
    cfg = cfg or ServingBenchConfig()
    t0 = time.time()
    shutil.rmtree(cfg.work_dir / "export", ignore_errors=True)
    _export(cfg, cfg.work_dir / "export")
    rows = run(cfg)
    scaled = scaling(cfg) if cfg.instance_counts else []
    core = repair_core_timings(cfg.work_dir / "export" / DIRECTIONS_FILE, cfg.batch_sizes)
    prepare(cfg)  # the repository as measured first (scaling rebuilt it with other instance counts)
    core.update(graph_timings(cfg, _inputs(cfg, cfg.work_dir / "export", max(cfg.batch_sizes))))
    path = write_results(cfg, rows, scaled, core, time.time() - t0)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
