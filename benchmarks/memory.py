"""``fire bench memory``: what each protected model costs in memory on the CPU profile.

One repository of N protected copies of the bundled CIFAR-10 model (the default build: ensemble, head,
repair, tail and the GPU profile's input check, which the CPU profile loads but never calls), served by
one tritonserver for N = 1, 3 and 10. Measured from /proc once every model is ready: the proportional set
size (PSS: shared library pages divided among the processes that map them, so it adds up) of the server
and of every Python-backend stub, and RSS for reference.

Writes results/memory.md.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from calibration import CalibrationConfig, calibrate
from fire_backend.names import DIRECTIONS_FILE, PROJECT_ROOT
from modelio.export import export_split
from serving.procfs import pss_mib, rss_mib, stubs
from serving.repository import ProtectedModel, build_repository
from serving.server import ServerConfig, TritonServer


@dataclass
class MemoryConfig:
    model_dir: Path = PROJECT_ROOT / "models" / "cifar10_resnet_badnets"
    counts: tuple[int, ...] = (1, 3, 10)
    work_dir: Path = PROJECT_ROOT / "build" / "memory"
    out: Path = PROJECT_ROOT / "results" / "memory.md"
    target_mib: float = 120.0
    rows: list[dict] = field(default_factory=list)


def _measure(repo: Path) -> dict:
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        time.sleep(2.0)  # let the stubs finish their imports' lazy page-ins before reading /proc
        pid = server.process.pid
        live = stubs(pid)
        return {
            "stubs": len(live),
            "server_pss": pss_mib(pid),
            "stubs_pss": sum(pss_mib(p) for p in live),
            "stubs_rss": sum(rss_mib(p) for p in live),
            "per_stub": {m: round(pss_mib(p), 1) for p, m in sorted(live.items(), key=lambda kv: kv[1])},
        }


def run_memory(cfg: MemoryConfig | None = None) -> Path:
    cfg = cfg or MemoryConfig()
    export_dir = cfg.work_dir / "export"
    export_split(cfg.model_dir, "layer2", export_dir)
    directions = export_dir / DIRECTIONS_FILE
    calibrate(export_dir, directions, CalibrationConfig(n_poisoned=50, n_clean=200))
    rows = []
    for n in cfg.counts:
        repo = cfg.work_dir / f"repo{n}"
        shutil.rmtree(repo, ignore_errors=True)
        build_repository([ProtectedModel(f"m{i}", export_dir, directions) for i in range(n)], repo)
        rows.append({"models": n, **_measure(repo)})
    first = rows[0]
    lines = [
        "# Memory per protected model (CPU profile)",
        "",
        "One tritonserver serving N protected copies of the bundled CIFAR-10 ResNet (default build: ensemble, "
        "head, repair, tail, and the GPU profile's input check, loaded on CPU but never called). PSS from "
        "/proc/<pid>/smaps_rollup once every model is ready; MiB.",
        "",
        "| protected models | stubs | server PSS | stubs PSS (sum) | stubs RSS (sum) | total PSS | PSS per model, "
        f"added beyond the first (target <= {cfg.target_mib:.0f}) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        total = r["server_pss"] + r["stubs_pss"]
        base = first["server_pss"] + first["stubs_pss"]
        per = (total - base) / (r["models"] - first["models"]) if r["models"] > first["models"] else total
        lines.append(f"| {r['models']} | {r['stubs']} | {r['server_pss']:.0f} | {r['stubs_pss']:.0f} | "
                     f"{r['stubs_rss']:.0f} | {total:.0f} | {per:.0f} |")  # fmt: skip
    per_stub = ", ".join(f"{m} {v}" for m, v in first["per_stub"].items())
    lines += ["", f"Per stub, one protected model (PSS, MiB): {per_stub}", "", "Command: `fire bench memory`", ""]
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text("\n".join(lines))
    return cfg.out
