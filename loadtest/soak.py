"""Soak: a fixed request rate over both protocols for a bounded time, watching errors, memory and shm.

Open loop: one sender per protocol, each at half the rate, mixed clean/triggered real test images.
Every few seconds it samples the resident memory of tritonserver and its stubs and this server's
/dev/shm regions. Passing means: 0 errors, RSS growth after warm-up < 10 %, a stable /dev/shm.

    fire soak --minutes 10 --rate 40          # writes results/soak.md and results/soak.png
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from clients import FireClient
from fire_backend.names import PROJECT_ROOT, REPOSITORY_DIR
from modelio.preprocess import Preprocess
from serving.repository import traffic_for
from serving.server import ServerConfig, TritonServer
from zoo.attacks import attack_from_spec
from zoo.data import load_dataset, to_tensor_batch


@dataclass
class SoakConfig:
    repository: Path = PROJECT_ROOT / REPOSITORY_DIR
    model: str = "cifar10"
    duration_s: float = 600.0
    warmup_s: float = 60.0
    rate_per_s: float = 40.0  # requests per second, both protocols together
    batch_size: int = 4
    triggered_ratio: float = 0.5
    sample_every_s: float = 5.0
    max_rss_growth: float = 0.10
    out: Path | None = PROJECT_ROOT / "results" / "soak.md"
    command: str = "fire soak --minutes 10 --rate 40"


@dataclass
class Sample:
    t: float
    rss_mb: float  # tritonserver + every stub
    processes: int
    shm_regions: int
    shm_mb: float


@dataclass
class SoakReport:
    config: dict
    requests: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)
    triggered_images: int = 0
    triggered_to_target: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    rss_growth: float = 0.0
    shm_stable: bool = True
    passed: bool = False


def _tree_rss(pid: int) -> tuple[float, int]:
    """Resident MB of ``pid`` and all its descendants, and how many processes that is."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    total, count, todo = 0.0, 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
                    count += 1
        except OSError:
            continue
        todo += children.get(p, [])
    return total, count


def _sender(
    url: str,
    protocol: str,
    cfg: SoakConfig,
    batches,
    stop: threading.Event,
    report: SoakReport,
    latencies: list[float],
    lock: threading.Lock,
    target: int,
) -> None:
    client = FireClient(url, protocol, timeout_s=30)
    period, next_at, rng = 2.0 / cfg.rate_per_s, time.perf_counter(), np.random.default_rng(hash(protocol) % 2**32)
    while not stop.is_set():
        triggered = bool(rng.random() < cfg.triggered_ratio)
        pool = batches[triggered]
        x = pool[int(rng.integers(len(pool)))]
        t0 = time.perf_counter()
        try:
            logits = client.infer(cfg.model, x)
            with lock:
                latencies.append(time.perf_counter() - t0)
                report.requests[protocol] += 1
                if triggered:
                    report.triggered_images += len(logits)
                    report.triggered_to_target += int((logits.argmax(1) == target).sum())
        except Exception as e:  # every error counts against the soak
            with lock:
                report.errors[protocol] += 1
                if len(report.first_errors) < 5:
                    report.first_errors.append(f"{protocol}: {e}")
        next_at += period
        delay = next_at - time.perf_counter()
        if delay > 0:
            stop.wait(delay)
        else:
            next_at = time.perf_counter()  # fell behind: no burst to catch up


def run_soak(cfg: SoakConfig, server: TritonServer | None = None) -> SoakReport:
    """Soak ``server`` (or one started here on ``cfg.repository``) and write the report."""
    traffic = traffic_for(server.config.repository if server else cfg.repository, cfg.model)
    test = load_dataset(traffic.dataset, "test").subset(512, seed=0)
    attack = attack_from_spec(traffic.attack)
    prepare = Preprocess.from_dict(traffic.preprocess).apply if traffic.preprocess else to_tensor_batch
    clean = prepare(test.images)
    trig = prepare(attack.apply(test.images[test.labels != attack.target]))
    b = cfg.batch_size
    batches = {
        False: [clean[i : i + b] for i in range(0, len(clean) - b, b)],
        True: [trig[i : i + b] for i in range(0, len(trig) - b, b)],
    }
    own = server is None
    if own:
        server = TritonServer(ServerConfig(cfg.repository, http_port=0, grpc_port=0, metrics_port=0)).start()
    report = SoakReport(
        config={k: str(v) for k, v in asdict(cfg).items()},
        requests={"grpc": 0, "http": 0},
        errors={"grpc": 0, "http": 0},
    )
    stop, lock, latencies = threading.Event(), threading.Lock(), []
    try:
        senders = [
            threading.Thread(
                target=_sender,
                args=(url, proto, cfg, batches, stop, report, latencies, lock, attack.target),
                daemon=True,
            )
            for proto, url in (("grpc", server.grpc_url), ("http", server.http_url))
        ]
        t_start = time.time()
        for s in senders:
            s.start()
        while time.time() - t_start < cfg.duration_s:
            rss, n = _tree_rss(server.process.pid)
            regions = server.shm_regions()
            shm_mb = sum((Path("/dev/shm") / r).stat().st_size for r in regions) / 2**20
            report.samples.append(Sample(time.time() - t_start, rss, n, len(regions), shm_mb))
            time.sleep(min(cfg.sample_every_s, max(0.0, cfg.duration_s - (time.time() - t_start))))
        stop.set()
        for s in senders:
            s.join()
    finally:
        if own:
            server.stop()
    after = [s for s in report.samples if s.t >= cfg.warmup_s] or report.samples[-1:]
    report.rss_growth = (after[-1].rss_mb - after[0].rss_mb) / after[0].rss_mb
    report.shm_stable = len({(s.shm_regions, round(s.shm_mb, 1)) for s in after}) == 1
    if latencies:
        report.p50_ms, report.p99_ms = (1e3 * float(np.percentile(latencies, q)) for q in (50, 99))
    report.passed = sum(report.errors.values()) == 0 and report.rss_growth < cfg.max_rss_growth and report.shm_stable
    if cfg.out:
        write_report(cfg, report)
    return report


def write_report(cfg: SoakConfig, r: SoakReport) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_req = sum(r.requests.values())
    asr = r.triggered_to_target / r.triggered_images if r.triggered_images else float("nan")
    lines = [
        f"# Soak: {cfg.duration_s / 60:g} min, {cfg.rate_per_s:g} requests/s (gRPC + HTTP), batch {cfg.batch_size}",
        "",
        f"Verdict: **{'PASS' if r.passed else 'FAIL'}**",
        "",
        "| measure | value | bound |",
        "|---|---:|---|",
        f"| requests (gRPC / HTTP) | {r.requests['grpc']} / {r.requests['http']} | |",
        f"| errors (gRPC / HTTP) | {r.errors['grpc']} / {r.errors['http']} | 0 |",
        f"| achieved rate | {n_req / cfg.duration_s:.1f} /s | {cfg.rate_per_s:g} /s asked |",
        f"| latency p50 / p99 | {r.p50_ms:.1f} / {r.p99_ms:.1f} ms | |",
        f"| live ASR on triggered images | {100 * asr:.2f} % | |",
        f"| server RSS growth after {cfg.warmup_s:g} s warm-up | {100 * r.rss_growth:+.2f} % | < "
        f"{100 * cfg.max_rss_growth:g} % |",
        f"| /dev/shm regions stable after warm-up | {'yes' if r.shm_stable else 'no'} | yes |",
        "",
        "| t (s) | RSS MB (server + stubs) | processes | shm regions | shm MB |",
        "|---:|---:|---:|---:|---:|",
    ]
    step = max(1, len(r.samples) // 20)
    for s in r.samples[::step] + ([r.samples[-1]] if (len(r.samples) - 1) % step else []):
        lines.append(f"| {s.t:.0f} | {s.rss_mb:.1f} | {s.processes} | {s.shm_regions} | {s.shm_mb:.1f} |")
    if r.first_errors:
        lines += ["", "First errors:", *[f"- `{e}`" for e in r.first_errors]]
    lines += ["", f"Command: `{cfg.command}`", ""]
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text("\n".join(lines))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([s.t for s in r.samples], [s.rss_mb for s in r.samples], marker=".")
    ax.axvline(cfg.warmup_s, color="gray", linestyle="--", label="end of warm-up")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS MB (server + stubs)")
    ax.set_title("soak: server memory")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(cfg.out.with_suffix(".png"), dpi=110)
    plt.close(fig)
