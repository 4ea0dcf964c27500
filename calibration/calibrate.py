"""``calibrate``: estimate the backdoor direction at the split layer and write the direction file.

Reads only what ``fire export`` wrote (head.onnx, split.json) and the training split. Calibration
samples come from the training split; evaluation uses the test split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibration.estimators import mean_features, paired_direction, photometric_views, unpaired_direction
from calibration.factory import make_directions
from fire_backend.directions import DirectionFile
from fire_backend.names import FEATURES, FEATURES2, INPUT
from fire_backend.onnx_runtime import onnx_session
from fire_backend.repair import Repair
from modelio.export import ExportInfo
from zoo.attacks import Attack, attack_from_spec
from zoo.data import load_dataset, to_tensor_batch


@dataclass
class CalibrationConfig:
    estimator: str = "paired"  # paired | unpaired
    mode: str = "project"  # the default repair mode written into the file
    alpha: float = 1.0
    n_poisoned: int = 200  # poisoned calibration samples (the defender's observations)
    n_clean: int = 1000  # clean samples for mu and the gated threshold
    fpr: float = 0.01  # gated: share of clean samples allowed above the threshold
    views: int = 4  # unpaired: photometric views per image
    seed: int = 0
    attack: dict[str, Any] = field(default_factory=dict)  # empty: the attack recorded in split.json


class HeadFeatures:
    """The deployed head (ONNX, onnxruntime) as a feature function on uint8 NHWC images."""

    def __init__(self, export_dir: str | Path, threads: int = 2):
        self.session = onnx_session(Path(export_dir) / "head.onnx", threads=threads)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([FEATURES], {INPUT: to_tensor_batch(images)})[0]


@dataclass
class CalibrationPool:
    """Disjoint samples from the training split: images the defender sees triggered (with their true
    labels; none of the target class for all-to-one attacks) and clean images with labels."""

    to_poison: np.ndarray
    poison_labels: np.ndarray
    clean: np.ndarray
    clean_labels: np.ndarray
    num_classes: int


def calibration_pool(dataset: str, attack: Attack, n_poisoned: int, n_clean: int, seed: int) -> CalibrationPool:
    train = load_dataset(dataset, "train")
    order = np.random.default_rng(seed).permutation(len(train))
    candidates = order[attack.counts_for_asr(train.labels[order])]
    poison_idx = candidates[:n_poisoned]
    clean_idx = np.setdiff1d(order, poison_idx, assume_unique=True)[:n_clean]
    if len(poison_idx) < n_poisoned or len(clean_idx) < n_clean:
        raise ValueError(f"training split too small for {n_poisoned} poisoned + {n_clean} clean samples")
    return CalibrationPool(
        train.images[poison_idx],
        train.labels[poison_idx],
        train.images[clean_idx],
        train.labels[clean_idx],
        train.num_classes,
    )


def calibrate(export_dir: str | Path, out_path: str | Path, config: CalibrationConfig | None = None) -> DirectionFile:
    """Estimate the direction at the export's (first) layer from the deployed head; write ``out_path``."""
    config = config or CalibrationConfig()
    info = ExportInfo.read(export_dir)
    features = HeadFeatures(export_dir)
    d = _estimate(features, info, info.layer, info.head_sha256, config)
    d.save(out_path)
    return d


def calibrate_second(
    export_dir: str | Path, first: DirectionFile, out_path: str | Path, config: CalibrationConfig | None = None
) -> DirectionFile:
    """Multi-layer: the direction at ``layer2``, estimated on what the served chain computes there,
    mid(repair1(head(x))), and bound to mid.onnx (the model that produces the second repair's input)."""
    config = config or CalibrationConfig()
    info = ExportInfo.read(export_dir)
    if not info.multilayer:
        raise ValueError(f"{export_dir} has one layer; export with a second layer for multi-layer repair")
    head = HeadFeatures(export_dir)
    mid = onnx_session(Path(export_dir) / "mid.onnx", threads=2)
    repair = Repair(first)

    def features(images: np.ndarray) -> np.ndarray:
        repaired = repair(torch.from_numpy(head(images))).numpy()
        return mid.run([FEATURES2], {FEATURES: repaired})[0]

    d = _estimate(features, info, info.layer2, info.mid_sha256, config)
    d.extra["first_layer_directions_sha256"] = first.metadata()["tensors_sha256"]
    d.save(out_path)
    return d


def batched(features, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``features`` over ``images`` in batches, concatenated."""
    return np.concatenate([features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def unpaired_beta(features, clean: np.ndarray, poisoned: np.ndarray, views: int, seed: int):
    """The unpaired estimate from two unrelated image sets, each averaged over photometric views."""
    return unpaired_direction(
        mean_features(features, photometric_views(clean, views, seed + 1)),
        mean_features(features, photometric_views(poisoned, views, seed)),
    )


def _estimate(features, info: ExportInfo, layer: str, producer_sha256: str, config: CalibrationConfig) -> DirectionFile:
    attack = attack_from_spec(config.attack or info.attack)
    pool = calibration_pool(info.dataset, attack, config.n_poisoned, config.n_clean, config.seed)
    poisoned = attack.apply(pool.to_poison)
    if config.estimator == "paired":
        beta = paired_direction(batched(features, pool.to_poison), batched(features, poisoned))
    elif config.estimator == "unpaired":
        beta = unpaired_beta(features, pool.clean, poisoned, config.views, config.seed)
    else:
        raise ValueError(f"unknown estimator {config.estimator!r}; choose 'paired' or 'unpaired'")
    return make_directions(
        beta,
        batched(features, pool.clean),
        layer=layer,
        mode=config.mode,
        alpha=config.alpha,
        fpr=config.fpr,
        estimator=config.estimator,
        head_sha256=producer_sha256,
        n_poisoned=config.n_poisoned,
        extra={"attack": attack.spec(), "calibration": asdict(config), "dataset": info.dataset},
    )
