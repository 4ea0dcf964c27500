"""Headless load test: locust against the protected and the plain model, one after the other, bounded in
users and time; locust's CSV files, a markdown summary and a latency plot come out.

    fire loadtest --protocol grpc --models cifar10 cifar10_plain --users 4 --run-time 20
    fire loadtest --url 127.0.0.1:8001 ...      # target a running server instead of starting one

Loopback targets only, unless ``allow_remote`` (then only a machine you run).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fire_backend.errors import InvalidInputError, StepFailedError
from fire_backend.names import PROJECT_ROOT, REPOSITORY_DIR
from fire_backend.network import host_of, is_loopback
from serving.repository import traffic_for
from serving.server import ServerConfig, TritonServer
from zoo.attacks import attack_from_spec

HERE = Path(__file__).resolve().parent


@dataclass
class LoadTestConfig:
    models: list[str] = field(default_factory=lambda: ["cifar10", "cifar10_plain"])
    protocol: str = "grpc"
    url: str | None = None  # host:port of a running server; None: start one on `repository`
    repository: Path = PROJECT_ROOT / REPOSITORY_DIR
    users: int = 4
    spawn_rate: float = 4.0
    run_time_s: int = 20
    batch_size: int = 1
    triggered_ratio: float = 0.5
    dataset: str | None = None  # None: the one the protected model's direction file records (else cifar10)
    attack: str | None = None  # None: the attack it records (else badnets)
    clean: list[str] = field(default_factory=list)  # the user's clean images (folders, files, .npz), not a dataset
    triggered: list[str] = field(default_factory=list)  # and triggered ones (default: the attack put on the clean ones)
    target: int | None = None  # with triggered images: the attacker's class (default: the recorded attack's)
    out_dir: Path = PROJECT_ROOT / "results" / "loadtest"
    allow_remote: bool = False


def _locust(cfg: LoadTestConfig, host: str, model: str, prefix: Path) -> None:
    locustfile = HERE / f"locust_{cfg.protocol}.py"
    traffic = traffic_for(cfg.repository, model, cfg.dataset, {"name": cfg.attack} if cfg.attack else None)
    images = _user_images(cfg, traffic, prefix) if cfg.clean else None
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(locustfile),
        "--headless",
        "--only-summary",
        "-u",
        str(cfg.users),
        "-r",
        str(cfg.spawn_rate),
        "-t",
        f"{cfg.run_time_s}s",
        "--stop-timeout",
        "10",
        "--host",
        host,
        "--csv",
        str(prefix),
        "--csv-full-history",
        "--exit-code-on-error",
        "0",
        "--model",
        model,
        "--batch-size",
        str(cfg.batch_size),
        "--triggered-ratio",
        str(cfg.triggered_ratio),
        "--dataset",
        traffic.dataset,
        "--attack-spec",
        json.dumps(traffic.attack),
        "--preprocess",
        json.dumps(traffic.preprocess),
        "--tally-file",
        f"{prefix}_tally.json",
    ]
    if cfg.allow_remote:
        cmd.append("--allow-remote")
    if images is not None:
        cmd += ["--images", str(images)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.run_time_s + 120)
    (prefix.parent / f"{prefix.name}_locust.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise StepFailedError(f"locust failed for {model} (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


def _user_images(cfg: LoadTestConfig, traffic, prefix: Path) -> Path:
    """The user's images at the served size, as one private .npz the locust processes read (``--images``)."""
    from calibration.imagesets import read_image_set
    from modelio.preprocess import Preprocess

    if not traffic.preprocess:
        raise InvalidInputError(f"no preprocessing recorded in {cfg.repository}: load-test it with --dataset")
    pre = Preprocess.from_dict(traffic.preprocess)
    clean = read_image_set(cfg.clean, (pre.height, pre.width)).images
    if cfg.triggered:
        triggered = read_image_set(cfg.triggered, (pre.height, pre.width)).images
        target = cfg.target if cfg.target is not None else traffic.attack.get("target", -1)
    else:
        attack = attack_from_spec(traffic.attack)
        triggered, target = attack.apply(clean), attack.target
    path = prefix.parent / f"{prefix.name}_images.npz"
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        np.savez(f, clean=clean, triggered=triggered, target=np.int64(target))
    return path


def summarize(prefix: Path, batch_size: int) -> dict:
    """The aggregated row of locust's ``_stats.csv`` plus the live-ASR tally."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        agg = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    tally = json.loads(Path(f"{prefix}_tally.json").read_text())
    rps = float(agg["Requests/s"])
    return {
        "requests": int(agg["Request Count"]),
        "failures": int(agg["Failure Count"]),
        "requests_per_s": rps,
        "images_per_s": rps * batch_size,
        "p50_ms": float(agg["50%"]),
        "p95_ms": float(agg["95%"]),
        "p99_ms": float(agg["99%"]),
        **tally,
    }


def plot(prefixes: dict[str, Path], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for model, prefix in prefixes.items():
        with open(f"{prefix}_stats_history.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated" and r["50%"] not in ("N/A", "0")]
        if not rows:
            continue
        t0 = int(rows[0]["Timestamp"])
        t = [int(r["Timestamp"]) - t0 for r in rows]
        line = ax.plot(t, [float(r["50%"]) for r in rows], label=f"{model} p50")[0]
        ax.plot(t, [float(r["95%"]) for r in rows], linestyle="--", color=line.get_color(), label=f"{model} p95")
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_loadtest(cfg: LoadTestConfig) -> Path:
    """Run locust per model; write ``<out>/<protocol>_summary.md`` and ``<protocol>_latency.png``."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    server = None
    if cfg.url is None:
        server = TritonServer(ServerConfig(cfg.repository, http_port=0, grpc_port=0, metrics_port=0)).start()
        cfg.url = server.grpc_url if cfg.protocol == "grpc" else server.http_url
    try:
        if not cfg.allow_remote and not is_loopback(host_of(cfg.url)):
            raise InvalidInputError(
                f"refusing to load-test {cfg.url}: not a loopback address (allow_remote to override)"
            )
        host = cfg.url if cfg.protocol == "grpc" else f"http://{cfg.url.split('://')[-1]}"
        prefixes = {}
        for model in cfg.models:
            prefixes[model] = cfg.out_dir / f"{cfg.protocol}_{model}"
            _locust(cfg, host, model, prefixes[model])
    finally:
        if server is not None:
            server.stop()
    rows = {m: summarize(p, cfg.batch_size) for m, p in prefixes.items()}
    lines = [
        f"# Load test ({cfg.protocol}): {cfg.users} users, {cfg.run_time_s} s per model, batch {cfg.batch_size}, "
        f"{100 * cfg.triggered_ratio:.0f} % triggered requests",
        "",
        "| model | requests | failures | req/s | images/s | p50 ms | p95 ms | p99 ms | live ASR % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, r in rows.items():
        asr = "n/a" if r["live_asr"] is None else f"{100 * r['live_asr']:.1f}"
        lines.append(
            f"| {m} | {r['requests']} | {r['failures']} | {r['requests_per_s']:.1f} | {r['images_per_s']:.0f} | "
            f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {asr} |"
        )
    lines += [
        "",
        "Live ASR: triggered images answered with the attack's target class (a served answer, not an "
        "error). Latencies are locust's (whole milliseconds). CSVs: `<protocol>_<model>_stats*.csv`.",
        "",
    ]
    summary = cfg.out_dir / f"{cfg.protocol}_summary.md"
    summary.write_text("\n".join(lines))
    (cfg.out_dir / f"{cfg.protocol}_summary.json").write_text(json.dumps(rows, indent=2))
    plot(prefixes, cfg.out_dir / f"{cfg.protocol}_latency.png", f"latency under load ({cfg.protocol})")
    return summary
