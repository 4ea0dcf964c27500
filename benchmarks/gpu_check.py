"""The GPU check: the gpu_torch profile proven on a GPU machine that has no tritonserver, no TensorRT
and no network (``scripts/gpu_check.sh``; dry run here with ``--cpu``).

``prepare`` (here) writes everything the machine needs into ``build/gpu_check`` (carried, <= 64 MiB
with the working tree):
- ``repo/``: a repository protecting the bundled CIFAR-10 BadNets model (head, repair, tail; plain and
  whole beside it), with every profile's configs, the halves as ONNX and TorchScript;
- ``batch.npz``: a fixed reference batch, clean and triggered test images;
- ``bundle.tar.xz``: a trimmed tritonserver from the nvidia-pytriton wheel (the server, the libraries
  it loads from the wheel, the Python backend, the stub for the machine's Python), a numpy < 2 for
  that Python (the stubs misread tensors with numpy 2), tritonclient's Python package, and the server
  guard library built here (no compiler there).

``run`` unpacks the bundle the same way on either machine, serves ``repo`` with the profiles asked
for, and asserts: every model READY; the repair's features arrive where the profile puts them (GPU
memory on a GPU) and are edited in place (the repair model logs its first request); repaired
features equal ``NumpyRepair`` within 1e-5 and logits equal the CPU profile's computation
(onnxruntime halves, NumPy repair) within 1e-3 on the reference batch; 8 concurrent clients x 50
requests all match; NaN features and out-of-range pixels are refused and the server keeps serving.
It measures batch-1 and batch-32 p50/p99 of FIRE vs plain vs whole, one closed-loop client, and the
repair step's compute time from Triton's statistics API, and writes ``gpu_check.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fire_backend.names import (
    CPU_PROFILE,
    DIRECTIONS_FILE,
    FEATURES,
    GPU_TORCH_PROFILE,
    MODEL_VERSION,
    PROJECT_ROOT,
    REPAIRED,
    WHOLE_ONNX,
    ModelNames,
)

NAME = "cifar10"  # the protected model of the check's repository
ON_CPU = "gpu_torch_cpu"  # the gpu_torch configs with CPU instances: the dry run's second profile
FEATURE_TOL, LOGIT_TOL = 1e-5, 1e-3
CARRY_LIMIT = 64 << 20  # what one device call carries: the working tree and build/gpu_check together


@dataclass
class GpuCheckConfig:
    work: Path = PROJECT_ROOT / "build" / "gpu_check"
    model: Path = PROJECT_ROOT / "models" / "cifar10_resnet_badnets"
    layer: str = "layer2"  # 32 x 16 x 16 features
    python: str = "3.12"  # the GPU machine's Python: its stub and its numpy wheel go in the bundle
    numpy: str = "1.26.4"
    clean: int = 32  # reference batch: clean and triggered test images
    triggered: int = 32
    clients: int = 8
    requests: int = 50  # per client
    latency_rounds: int = 200  # per (model, batch size), interleaved
    batch_sizes: tuple[int, ...] = (1, 32)


# -- prepare (this machine) ------------------------------------------------------------------------


def prepare(cfg: GpuCheckConfig) -> dict:
    """Repository, reference batch and bundle under ``cfg.work``; returns their sizes in bytes."""
    from calibration.calibrate import CalibrationConfig, calibrate
    from modelio.export import export_split
    from serving.repository import ProtectedModel, build_repository
    from zoo.attacks import attack_from_spec
    from zoo.data import load_dataset

    work = cfg.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    export = work / "export"
    info = export_split(cfg.model, cfg.layer, export, n_check=64)
    calibrate(export, export / DIRECTIONS_FILE, CalibrationConfig(n_poisoned=100, n_clean=300))
    build_repository([ProtectedModel(NAME, export, export / DIRECTIONS_FILE, plain=True, whole=True)], work / "repo")
    shutil.rmtree(export)
    test = load_dataset(info.dataset, "test")
    attack = attack_from_spec(info.attack)
    rng = np.random.default_rng(0)
    clean = rng.choice(len(test.labels), cfg.clean, replace=False)
    others = rng.choice(np.flatnonzero(test.labels != attack.target), cfg.triggered, replace=False)
    images = np.concatenate([test.images[clean], attack.apply(test.images[others])])
    labels = np.concatenate([test.labels[clean], test.labels[others]])
    np.savez_compressed(work / "batch.npz", images=images, labels=labels, target=attack.target)
    build_bundle(work / "bundle.tar.xz", cfg.python, cfg.numpy)
    return sizes(work)


def sizes(work: Path) -> dict:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT_ROOT, capture_output=True, check=True).stdout
    tree = sum(
        (PROJECT_ROOT / f).stat().st_size for f in tracked.decode().split("\0") if f and (PROJECT_ROOT / f).is_file()
    )
    carried = sum(p.stat().st_size for p in work.rglob("*") if p.is_file() and "unpacked" not in p.parts)
    bundle = (work / "bundle.tar.xz").stat().st_size
    return {"working_tree": tree, "carried": carried, "bundle": bundle, "total": tree + carried, "limit": CARRY_LIMIT}


def _wheel_libraries(files: list[Path], libs: Path) -> set[Path]:
    """The wheel's libraries that ``files`` load, transitively (ldd resolves them through their RPATH)."""
    found = set()
    for f in files:
        out = subprocess.run(["ldd", str(f)], capture_output=True, text=True, check=False).stdout
        for m in re.finditer(r"=> (\S+) \(", out):
            p = Path(m.group(1)).resolve()
            if p.parent == libs.resolve():
                found.add(p)
    return found


def build_bundle(dest: Path, python: str, numpy_version: str) -> Path:
    """The trimmed server, numpy < 2 and tritonclient for ``python``, and the guard library, as tar.xz."""
    from serving import server_guard
    from serving.server import pytriton_root

    root = pytriton_root()
    libs = root.parent.parent / "nvidia_pytriton.libs"
    stub = root / "python_backend_stubs" / python / "triton_python_backend_stub"
    binary, backend = root / "bin" / "tritonserver", root / "backends" / "python"
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "bundle"
        (stage / "server" / "bin").mkdir(parents=True)
        shutil.copy2(binary, stage / "server" / "bin")
        shutil.copytree(backend, stage / "server" / "backends" / "python", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, stage / "server" / "backends" / "python" / "triton_python_backend_stub")
        (stage / "server" / "lib").mkdir()
        for lib in _wheel_libraries([binary, backend / "libtriton_python.so", stub], libs):
            shutil.copy2(lib, stage / "server" / "lib" / lib.name)
        site = stage / "site"
        _numpy_for(python, numpy_version, site, Path(tmp))
        import tritonclient

        shutil.copytree(Path(tritonclient.__file__).parent, site / "tritonclient",
                        ignore=shutil.ignore_patterns("__pycache__", "http"))  # fmt: skip
        shutil.copy2(server_guard.library(), stage / "libfire_server_guard.so")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(dest, "w:xz", preset=2) as tar:  # 161 MiB: 2 packs 37.9 MiB in 29 s, 3 37.2 in 48 s
            tar.add(stage, arcname="bundle")
    return dest


def _numpy_for(python: str, version: str, site: Path, tmp: Path) -> None:
    """numpy ``version`` for CPython ``python`` (manylinux x86-64), unpacked into ``site`` without its tests."""
    tag = python.replace(".", "")
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", f"numpy=={version}", "--no-deps",
                    "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp", "--abi", f"cp{tag}",
                    "--platform", "manylinux2014_x86_64", "-d", str(wheels)], check=True)  # fmt: skip
    (wheel,) = wheels.glob("numpy-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    for tests in site.glob("numpy/**/tests"):
        shutil.rmtree(tests, ignore_errors=True)


# -- run (either machine) --------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Report:
    device: str
    profile: str
    checks: list[Check] = field(default_factory=list)
    latency: list[dict] = field(default_factory=list)
    repair_compute_us: dict = field(default_factory=dict)
    targets: list[Check] = field(default_factory=list)

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append(Check(name, bool(passed), detail))

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def unpack(work: Path, cpu: bool) -> Path:
    """The bundle unpacked in ``work/unpacked``, its guard library in this user's cache, and the
    environment the server and its stubs need. On CPU (the dry run) this Python's own stub and numpy
    replace the bundle's, which are for the GPU machine's Python."""
    from fire_backend.cache import cache_dir
    from serving import server_guard

    dest = work / "unpacked"
    shutil.rmtree(dest, ignore_errors=True)
    with tarfile.open(work / "bundle.tar.xz") as tar:
        tar.extractall(dest, filter="data")
    root = dest / "bundle"
    guard = server_guard.library_path(cache_dir("native"))
    if not guard.exists():
        shutil.copy2(root / "libfire_server_guard.so", guard)
        guard.chmod(0o700)
    stub = root / "server" / "backends" / "python" / "triton_python_backend_stub"
    if cpu:
        from serving.server import pytriton_root

        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        shutil.copy2(pytriton_root() / "python_backend_stubs" / py / "triton_python_backend_stub", stub)
    else:  # the stubs import this numpy < 2 first; this process keeps its own (it is imported already)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "site"), os.environ.get("PYTHONPATH")]))
    sys.path.append(str(root / "site"))  # tritonclient, where this machine has none
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(root / "server" / "lib"),
                                                                  os.environ.get("LD_LIBRARY_PATH")]))  # fmt: skip
    ldd = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env=os.environ, check=False).stdout
    missing = [ln.split()[0] for ln in ldd.splitlines() if "not found" in ln]
    if missing:
        raise SystemExit(f"gpu_check: the stub cannot load {', '.join(missing)} on this machine (ldd {stub})")
    return root / "server"


class Reference:
    """The CPU profile's computation of the repository's protected model, in this process: onnxruntime
    halves and the NumPy repair."""

    def __init__(self, repo: Path):
        from fire_backend.directions import DirectionFile
        from fire_backend.formula import NumpyRepair
        from fire_backend.onnx_runtime import onnx_session

        n = ModelNames(NAME)
        self.head = onnx_session(repo / n.head / MODEL_VERSION / WHOLE_ONNX)
        self.tail = onnx_session(repo / n.tail / MODEL_VERSION / WHOLE_ONNX)
        self.repair = NumpyRepair(DirectionFile.load(repo / n.repair / MODEL_VERSION / DIRECTIONS_FILE))

    def features(self, x: np.ndarray) -> np.ndarray:
        return self.head.run(None, {self.head.get_inputs()[0].name: x})[0]

    def logits(self, x: np.ndarray, protected: bool = True) -> np.ndarray:
        f = self.features(x)
        f = self.repair.repair_with_scores(f.copy())[0] if protected else f
        return self.tail.run(None, {self.tail.get_inputs()[0].name: f})[0]


def _client(server):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(server.grpc_url)


def _infer(server, client, model: str, name: str, x: np.ndarray, out: str) -> np.ndarray:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inp = grpcclient.InferInput(name, list(x.shape), np_to_triton_dtype(x.dtype))
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], headers=server.headers("grpc")).as_numpy(out)


def _refused(server, client, model: str, name: str, x: np.ndarray, out: str, expect: str) -> str:
    from tritonclient.utils import InferenceServerException

    try:
        _infer(server, client, model, name, x, out)
    except InferenceServerException as e:
        return "" if expect in str(e) else f"refused with another message: {e}"
    return "accepted"


def _stats(server, model: str) -> dict[int, tuple[int, int]]:
    """batch size -> (executions, compute_infer ns) of ``model`` (Triton's statistics API, admin key)."""
    from serving.admin import admin_request

    status, body = admin_request(server.http_url, server.admin_key, f"/v2/models/{model}/stats", "GET", 10)
    if status != 200:
        raise SystemExit(f"gpu_check: statistics of {model}: HTTP {status}")
    stats = json.loads(body)["model_stats"][0]
    return {int(b["batch_size"]): (int(b["compute_infer"]["count"]), int(b["compute_infer"]["ns"]))
            for b in stats.get("batch_stats", [])}  # fmt: skip


def run_profile(cfg: GpuCheckConfig, server_dir: Path, profile: str, device: str) -> Report:
    from serving.server import ServerConfig, TritonServer

    repo = cfg.work / "repo"
    n = ModelNames(NAME)
    batch = np.load(cfg.work / "batch.npz")
    x = (batch["images"].astype(np.float32) / 255.0).transpose(0, 3, 1, 2).copy()  # the zoo export: NCHW [0, 1]
    ref = Reference(repo)
    report = Report(device, profile)
    config = ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0,
                          tritonserver=server_dir / "bin" / "tritonserver", backend_dir=server_dir / "backends",
                          model_config_name=None if profile == CPU_PROFILE else profile)  # fmt: skip
    with TritonServer(config) as server:
        states = server.model_states()
        report.check("every model READY", all(s.get("state") == "READY" for s in states.values()),
                     ", ".join(f"{m} {s.get('state')}" for m, s in sorted(states.items())))  # fmt: skip
        client = _client(server)
        io_in = client.get_model_metadata(NAME, headers=server.headers("grpc")).inputs[0].name
        io_out = client.get_model_metadata(NAME, headers=server.headers("grpc")).outputs[0].name
        logits = _infer(server, client, NAME, io_in, x, io_out)
        err = float(np.abs(logits - ref.logits(x)).max())
        name = f"logits equal the CPU profile's within {LOGIT_TOL:g}"
        report.check(name, err <= LOGIT_TOL, f"max abs diff {err:.2e}")
        target = int(batch["target"])
        asr = float((logits[cfg.clean :].argmax(1) == target).mean())
        acc = float((logits[: cfg.clean].argmax(1) == batch["labels"][: cfg.clean]).mean())
        report.check("FIRE repairs the reference batch", asr <= 0.2, f"clean accuracy {acc:.2f}, ASR {asr:.2f} "
                     f"({cfg.clean} clean, {cfg.triggered} triggered)")  # fmt: skip
        feats = ref.features(x)
        repaired = _infer(server, client, n.repair, FEATURES, feats, REPAIRED)
        err = float(np.abs(repaired - ref.repair.repair_with_scores(feats.copy())[0]).max())
        report.check(
            f"repaired features equal NumpyRepair within {FEATURE_TOL:g}", err <= FEATURE_TOL, f"max abs diff {err:.2e}"
        )
        log = server.log_path.read_text(errors="replace")
        m = re.search(rf"FIRE repair {n.repair}: first request's features in (\w+) memory \(is_cpu=(\w+)\), "
                      r"repaired on (\S+), in place: (\w+)", log)  # fmt: skip
        on_gpu = device != "cpu" and profile != CPU_PROFILE
        want = "GPU" if on_gpu else "host"
        report.check(f"repair inputs in {want} memory, edited in place",
                     bool(m) and m.group(1) == want and m.group(4) == "True",
                     m.group(0) if m else "no first-request line in the server log")  # fmt: skip
        report.check(*_concurrent(cfg, server, io_in, io_out, x, ref.logits(x)))
        bad = [
            (n.repair, FEATURES, np.full_like(feats[:2], np.nan), REPAIRED, "NaN"),
            (n.tail, FEATURES, np.full_like(feats[:2], np.nan), io_out, "NaN"),
            (NAME, io_in, np.full_like(x[:2], 2.0), io_out, "outside the expected pixel range"),
            (NAME, io_in, np.full_like(x[:2], np.nan), io_out, "NaN"),
        ]
        problems = [
            f"{model}: {p}"
            for model, name, v, out, expect in bad
            if (p := _refused(server, client, model, name, v, out, expect))
        ]
        still = float(np.abs(_infer(server, client, NAME, io_in, x[:4], io_out) - logits[:4]).max()) <= LOGIT_TOL
        report.check("NaN features and out-of-range pixels refused, the server keeps serving", not problems and still,
                     "; ".join(problems) or "4 refused, then served")  # fmt: skip
        before = _stats(server, n.repair)
        report.latency = _latency(cfg, server, client, [NAME, n.plain, n.whole], io_in, io_out, x)
        after = _stats(server, n.repair)
        for bs in cfg.batch_sizes:
            count = after.get(bs, (0, 0))[0] - before.get(bs, (0, 0))[0]
            ns = after.get(bs, (0, 0))[1] - before.get(bs, (0, 0))[1]
            report.repair_compute_us[bs] = ns / count / 1000 if count else float("nan")
    if on_gpu:
        big = max(cfg.batch_sizes)
        us = report.repair_compute_us.get(big, float("nan"))
        report.targets.append(Check(f"repair compute <= 30 us at batch {big}", us <= 30, f"{us:.1f} us"))
        rows = {r["model"]: r for r in report.latency if r["batch"] == big}
        ratio = rows[n.plain]["mean_ms"] / rows[NAME]["mean_ms"]
        report.targets.append(Check(f"FIRE / plain throughput >= 0.97 at batch {big}", ratio >= 0.97, f"{ratio:.3f}"))
    return report


def _concurrent(cfg, server, io_in: str, io_out: str, x: np.ndarray, want: np.ndarray) -> tuple[str, bool, str]:
    errors, worst = [], [0.0]
    lock = threading.Lock()

    def client_loop(seed: int) -> None:
        rng, client = np.random.default_rng(seed), _client(server)
        for _ in range(cfg.requests):
            idx = rng.choice(len(x), int(rng.integers(1, 9)), replace=False)
            try:
                err = float(np.abs(_infer(server, client, NAME, io_in, x[idx], io_out) - want[idx]).max())
            except Exception as e:  # noqa: BLE001 - reported as the check's failure
                with lock:
                    errors.append(str(e).splitlines()[0])
                continue
            with lock:
                worst[0] = max(worst[0], err)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(cfg.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = not errors and worst[0] <= LOGIT_TOL
    detail = f"{cfg.clients * cfg.requests} requests, {len(errors)} failed, max abs diff {worst[0]:.2e}"
    return (
        f"{cfg.clients} concurrent clients x {cfg.requests} requests all match",
        ok,
        detail + (f": {errors[0]}" if errors else ""),
    )


def _latency(cfg, server, client, models: list[str], io_in: str, io_out: str, x: np.ndarray) -> list[dict]:
    rows = []
    for bs in cfg.batch_sizes:
        xb = np.concatenate([x] * (bs // len(x) + 1))[:bs]
        times = {m: [] for m in models}
        for m in models:  # warm-up
            _infer(server, client, m, io_in, xb, io_out)
        for _ in range(cfg.latency_rounds):
            for m in models:  # interleaved: drift hits every model alike
                t = time.perf_counter()
                _infer(server, client, m, io_in, xb, io_out)
                times[m].append(time.perf_counter() - t)
        for m in models:
            ms = np.array(times[m]) * 1e3
            rows.append({"model": m, "batch": bs, "p50_ms": float(np.percentile(ms, 50)),
                         "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())})  # fmt: skip
    return rows


def write(reports: list[Report], out: Path, carried: dict | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {"reports": [asdict(r) for r in reports], "carried": carried}
    (out / "gpu_check.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = ["# GPU check", "", "Written by `bash scripts/gpu_check.sh` (`benchmarks/gpu_check.py`).", ""]
    for r in reports:
        lines += [f"## {r.profile} on {r.device}", "", "| check | result | detail |", "|---|---|---|"]
        lines += [f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.detail} |" for c in r.checks]
        lines += ["", "| model | batch | p50 ms | p99 ms |", "|---|---|---|---|"]
        lines += [f"| {x['model']} | {x['batch']} | {x['p50_ms']:.3f} | {x['p99_ms']:.3f} |" for x in r.latency]
        lines += ["", "Repair step compute (Triton statistics, compute_infer per execution): " +
                  ", ".join(f"batch {b}: {us:.1f} us" for b, us in r.repair_compute_us.items()), ""]  # fmt: skip
        if r.targets:
            lines += ["| target | met | measured |", "|---|---|---|"]
            lines += [f"| {t.name} | {'yes' if t.passed else 'MISSED'} | {t.detail} |" for t in r.targets] + [""]
    if carried:
        lines.append(f"Carried: {carried['total'] / 2**20:.1f} MiB of {carried['limit'] / 2**20:.0f} "
                     f"(working tree {carried['working_tree'] / 2**20:.1f}, "
                     f"bundle {carried['bundle'] / 2**20:.1f}).")  # fmt: skip
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["prepare", "run"])
    p.add_argument("--cpu", action="store_true", help="the dry run: CPU profile and gpu_torch on CPU instances")
    p.add_argument("--out", type=Path, default=None, help="where gpu_check.json/.md go (default: results/)")
    a = p.parse_args(argv)
    cfg = GpuCheckConfig(latency_rounds=20) if a.cpu else GpuCheckConfig()  # the dry run times less
    if a.step == "prepare":
        s = prepare(cfg)
        print(f"prepared {cfg.work}: {s['carried'] / 2**20:.1f} MiB carried + {s['working_tree'] / 2**20:.1f} MiB "
              f"working tree = {s['total'] / 2**20:.1f} MiB (limit {CARRY_LIMIT >> 20})")  # fmt: skip
        return 0 if s["total"] <= CARRY_LIMIT else 1
    device = _device()
    server_dir = unpack(cfg.work, a.cpu)
    if a.cpu:
        from serving.configs import profile_on_cpu

        profile_on_cpu(cfg.work / "repo", GPU_TORCH_PROFILE, ON_CPU)
        profiles = [CPU_PROFILE, ON_CPU]
    else:
        profiles = [GPU_TORCH_PROFILE]
    reports = [run_profile(cfg, server_dir, profile, device) for profile in profiles]
    carried = sizes(cfg.work) if (PROJECT_ROOT / ".git").exists() else None
    write(reports, a.out or PROJECT_ROOT / "results", carried)
    for r in reports:
        for c in r.checks + r.targets:
            print(f"{r.profile:14s} {'ok  ' if c.passed else 'FAIL'} {c.name}: {c.detail}")
    return 0 if all(r.passed for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
