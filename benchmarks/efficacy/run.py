"""Run the efficacy benchmark over every model, caching each model's rows (resumable)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from benchmarks.efficacy.config import EfficacyConfig
from benchmarks.efficacy.evaluate import evaluate_model
from benchmarks.efficacy.report import write_report
from fire_backend.files import sha256_file
from fire_backend.names import PROJECT_ROOT

# The packages whose code decides a model's rows: a cached row from other code is not reused.
ROW_CODE = ("benchmarks", "calibration", "fire_backend", "modelio", "zoo")


def source_fingerprint(root: Path, packages: tuple[str, ...] = ROW_CODE) -> str:
    """sha256 over the path and bytes of every .py file under ``root/PACKAGE`` for ``packages``: whole
    packages, not only the modules an evaluation imports (some import lazily), so it errs toward recomputing."""
    h = hashlib.sha256()
    for path in sorted(p for pkg in packages for p in (root / pkg).rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def run_efficacy(cfg: EfficacyConfig | None = None, models_dir: str | Path | None = None) -> list[Path]:
    """Evaluate every model and write the report. Each model's rows are kept in
    ``OUT/efficacy_runs/MODEL.json`` and reused by a later run with the same config, weights and code
    (``source_fingerprint``), so an interrupted run resumes where it stopped (delete the folder to start over)."""
    cfg = cfg or EfficacyConfig()
    models_dir = Path(models_dir) if models_dir else PROJECT_ROOT / "models"
    runs = Path(cfg.out) / "efficacy_runs"
    runs.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("models", "out", "plots")}
    key = json.dumps({**settings, "code": source_fingerprint(PROJECT_ROOT)}, sort_keys=True)
    rows: list[dict] = []
    seconds = 0.0
    for model in tqdm(cfg.models, desc="efficacy", unit="model", disable=None):
        path = Path(model) if Path(model).is_absolute() or Path(model).exists() else PROJECT_ROOT / model
        weights = sha256_file(path / "model.safetensors")
        cached = runs / f"{path.name}.json"
        if cached.is_file():
            saved = json.loads(cached.read_text())
            if saved["config"] == key and saved["weights"] == weights:
                rows += saved["rows"]
                seconds += saved["seconds"]
                continue
        t0 = time.time()
        model_rows = evaluate_model(path, cfg)
        took = time.time() - t0
        cached.write_text(json.dumps({"config": key, "weights": weights, "seconds": took, "rows": model_rows}))
        rows += model_rows
        seconds += took
    return write_report(rows, cfg, seconds, models_dir)


if __name__ == "__main__":
    for p in run_efficacy():
        print(p)
