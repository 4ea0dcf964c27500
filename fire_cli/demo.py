"""The main job, end to end: export -> calibrate -> build the repository -> serve -> measure.

Every step is the same function the CLI calls; the measurement goes through the real server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from calibration import CalibrationConfig, calibrate
from clients import evaluate_served
from fire_backend.names import DIRECTIONS_FILE, PROJECT_ROOT, REPOSITORY_DIR, ModelNames
from fire_cli.common import DEFAULT_MODEL_DIR
from modelio.export import export_split
from serving.repository import ProtectedModel, build_repository
from serving.server import ServerConfig, TritonServer
from zoo.attacks import attack_from_spec
from zoo.metrics import format_table


@dataclass
class DemoConfig:
    model_dir: Path = DEFAULT_MODEL_DIR
    name: str = "cifar10"
    layer: str = "layer2"
    pixels: str = "uint8"  # raw pixels in: what stock image clients (NVIDIA's image_client.py) send
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    work_dir: Path = PROJECT_ROOT / "build" / "demo"
    repository: Path = PROJECT_ROOT / REPOSITORY_DIR
    protocol: str = "grpc"
    limit: int = 0  # 0: the whole test split
    results: Path | None = PROJECT_ROOT / "results" / "demo.md"
    command: str = "fire demo"  # recorded in the report


def run_demo(cfg: DemoConfig) -> str:
    t0 = time.time()
    export_dir = cfg.work_dir / cfg.name
    print(f"[1/5] split {cfg.model_dir} after {cfg.layer!r}, export ONNX -> {export_dir}")
    info = export_split(cfg.model_dir, cfg.layer, export_dir, pixels=cfg.pixels)
    print(f"      split error {info.split_max_abs_err:.2g}, ONNX error {info.onnx_max_abs_err:.2g}")
    directions = export_dir / DIRECTIONS_FILE
    c = cfg.calibration
    print(
        f"[2/5] calibrate ({c.estimator}, {c.n_poisoned} poisoned + {c.n_clean} clean training images) -> {directions}"
    )
    calibrate(export_dir, directions, c)
    print(f"[3/5] build the model repository -> {cfg.repository}")
    # the unprotected twin is served too: the demo's point is the comparison
    build_repository([ProtectedModel(cfg.name, export_dir, directions, plain=True)], cfg.repository)
    print("[4/5] start tritonserver on 127.0.0.1")
    server = TritonServer(ServerConfig(cfg.repository, http_port=0, grpc_port=0, metrics_port=0))
    with server:
        url = server.grpc_url if cfg.protocol == "grpc" else server.http_url
        print(f"[5/5] evaluate through the server ({cfg.protocol} {url})")
        attack = attack_from_spec(info.attack)
        plain = ModelNames(cfg.name).plain
        results = evaluate_served(url, [plain, cfg.name], info.dataset, attack, cfg.protocol, limit=cfg.limit,
                                  preprocess=info.preprocessing())  # fmt: skip
    rows = {
        f"{plain} (no defense)": results[plain],
        f"{cfg.name} (FIRE {c.mode}, {cfg.layer})": results[cfg.name],
    }
    table = format_table(rows)
    report = (
        f"# FIRE demo: {info.dataset}, {attack.name} (target {attack.target})\n\n"
        f"Measured through Triton ({cfg.protocol}) on the {info.dataset} test split"
        f"{f' (subset of {cfg.limit})' if cfg.limit else ''}; {time.time() - t0:.0f} s in all.\n\n"
        f"{table}\n\nCommand: `{cfg.command}`\n"
    )
    if cfg.results:
        cfg.results.parent.mkdir(parents=True, exist_ok=True)
        cfg.results.write_text(report)
    return report
