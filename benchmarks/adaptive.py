"""Adaptive attacker: what FIRE does when the trigger at test time is not the one it was calibrated on.

The bundled BadNets CIFAR-10 model learned a 3x3 white patch in the bottom-right corner. FIRE is
calibrated on that trigger (200 paired samples); the attacker then changes it: a larger patch, a brighter
or dimmer one, the patch moved (off the calibrated direction), or a full-image blend. Each row reports
ASR/PA without defense and with each repair mode, on the CIFAR-10 test split, through the same head ->
repair -> tail computation the server runs (the served ensemble equals it within 1e-4, tested).

    python -m benchmarks.adaptive      # or: fire bench adaptive; writes results/adaptive.md
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from calibration import CalibrationConfig, HeadFeatures, calibrate
from fire_backend.names import DIRECTIONS_FILE, FEATURES, LOGITS, PROJECT_ROOT, TAIL_ONNX
from fire_backend.onnx_runtime import onnx_session
from fire_backend.repair import Repair
from modelio.export import export_split
from zoo.attacks import Trigger
from zoo.data import load_dataset

TARGET = 0


def patch(size: int, value: float = 255.0, corner: str = "bottom-right") -> Trigger:
    pattern = np.full((32, 32, 3), value, dtype=np.float32)
    mask = np.zeros((32, 32, 1), dtype=np.float32)
    rows = slice(32 - size, 32) if corner.startswith("bottom") else slice(0, size)
    cols = slice(32 - size, 32) if corner.endswith("right") else slice(0, size)
    mask[rows, cols] = 1.0
    return Trigger(pattern, mask)


def variants() -> dict[str, Trigger]:
    noise = np.random.default_rng(7).integers(0, 256, size=(32, 32, 3)).astype(np.float32)
    return {
        "calibrated: 3x3 white, bottom-right": patch(3),
        "scaled up: 5x5 white, bottom-right": patch(5),
        "scaled up: 8x8 white, bottom-right": patch(8),
        "dimmer: 3x3 gray (160), bottom-right": patch(3, 160.0),
        "shifted: 3x3 white, top-left": patch(3, corner="top-left"),
        "shifted: 3x3 white, bottom-left": patch(3, corner="bottom-left"),
        "calibrated patch + 10 % noise blend": Trigger(
            np.where(patch(3).mask > 0, 255.0, noise).astype(np.float32),
            np.where(patch(3).mask > 0, 1.0, 0.1).astype(np.float32),
        ),
    }


def run(
    model_dir: Path = PROJECT_ROOT / "models" / "cifar10_resnet_badnets",
    layer: str = "layer2",
    work_dir: Path = PROJECT_ROOT / "build" / "adaptive",
    out: Path = PROJECT_ROOT / "results" / "adaptive.md",
) -> str:
    t0 = time.time()
    export_split(model_dir, layer, work_dir)
    directions = calibrate(work_dir, work_dir / DIRECTIONS_FILE, CalibrationConfig(n_poisoned=200))
    head, tail = HeadFeatures(work_dir), onnx_session(work_dir / TAIL_ONNX, threads=2)
    test = load_dataset("cifar10", "test")
    keep = test.labels != TARGET
    repairs = {"none": None, **{m: Repair(directions, m) for m in ("project", "subtract", "gated")}}

    def predict(images: np.ndarray, repair: Repair | None) -> np.ndarray:
        out = []
        for i in range(0, len(images), 500):
            feats = head(images[i : i + 500])
            if repair is not None:
                feats = repair(torch.from_numpy(feats)).numpy()
            out.append(tail.run([LOGITS], {FEATURES: feats})[0].argmax(1))
        return np.concatenate(out)

    clean = {name: (predict(test.images, r) == test.labels).mean() for name, r in repairs.items()}
    lines = [
        "# Adaptive attacker: FIRE calibrated on the 3x3 BadNets patch, tested on other triggers",
        "",
        f"CIFAR-10 test split ({keep.sum()} triggered images per row), split after `{layer}`, 200 paired "
        f"calibration samples of the calibrated trigger. Clean accuracy: "
        + ", ".join(f"{n} {100 * v:.2f} %" for n, v in clean.items())
        + ".",
        "",
        "| trigger at test time | " + " | ".join(f"ASR / PA {n}" for n in repairs) + " |",
        "|---|" + "---:|" * len(repairs),
    ]
    for name, trig in tqdm(variants().items(), desc="triggers", disable=None):
        x = trig.stamp(test.images[keep])
        cells = []
        for r in repairs.values():
            pred = predict(x, r)
            cells.append(f"{100 * (pred == TARGET).mean():.1f} / {100 * (pred == test.labels[keep]).mean():.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Wall time {time.time() - t0:.0f} s. Command: `fire bench adaptive`", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out.read_text()


if __name__ == "__main__":
    print(run())
