"""``calibrate``: estimate the backdoor direction at the split layer and write the direction file.

Reads only what ``fire export`` wrote (head.onnx, split.json: input name and preprocessing) and a
``CalibrationSet``: the defender's clean images and triggered ones, either paired (the same images
without and with a known trigger) or flagged (triggered images seen in the wild, no originals).
For a zoo model the set comes from its dataset's training split; evaluation uses the test split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibration.augment import SpatialEstimate, spatial_estimate
from calibration.estimators import (
    mean_features,
    photometric_views,
    unpaired_direction,
    unpaired_reference,
)
from calibration.factory import make_directions
from fire_backend.directions import DirectionFile
from fire_backend.errors import InvalidInputError
from fire_backend.names import DEFAULT_AUGMENT, FEATURES, FEATURES2, HEAD_ONNX, MID_ONNX, TAIL_ONNX
from fire_backend.onnx_runtime import onnx_session
from fire_backend.repair import Repair
from modelio.export import ExportInfo
from zoo.attacks import Attack, attack_from_spec
from zoo.data import load_dataset


@dataclass
class CalibrationConfig:
    estimator: str = "paired"  # paired | unpaired (a flagged set is always unpaired)
    mode: str = "project"  # the default repair mode written into the file
    alpha: float = 1.0
    n_poisoned: int = 200  # poisoned calibration samples (the defender's observations)
    n_clean: int = 1000  # clean samples for mu and the gated threshold
    fpr: float = 0.01  # gated: share of clean samples allowed above the threshold
    views: int = 4  # unpaired without spatial views: photometric views per image
    augment: str = DEFAULT_AUGMENT  # spatial views of the images (calibration.augment): rank-k project repair
    seed: int = 0
    attack: dict[str, Any] = field(default_factory=dict)  # empty: the attack recorded in split.json


class HeadFeatures:
    """The deployed head (ONNX, onnxruntime) as a feature function on uint8 NHWC images, fed the way
    split.json says the model takes its input."""

    def __init__(self, export_dir: str | Path, threads: int = 2):
        info = ExportInfo.read(export_dir)
        self.session = onnx_session(Path(export_dir) / HEAD_ONNX, threads=threads)
        self.input_name, self.preprocess = info.input_name, info.preprocessing()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([FEATURES], {self.input_name: self.preprocess.apply(images)})[0]


@dataclass
class CalibrationSet:
    """The defender's images (uint8 NHWC): clean ones for mu and the threshold, and triggered ones."""

    clean: np.ndarray
    triggered: np.ndarray
    originals: np.ndarray | None = None  # paired: triggered[i] is originals[i] with the trigger on
    clean_labels: np.ndarray | None = None
    original_labels: np.ndarray | None = None
    num_classes: int | None = None
    provenance: dict = field(default_factory=dict)  # attack spec, dataset or folders: recorded in the file

    @property
    def paired(self) -> bool:
        return self.originals is not None

    @classmethod
    def with_trigger(
        cls,
        images: np.ndarray,
        attack: Attack,
        n_poisoned: int,
        n_clean: int,
        labels: np.ndarray | None = None,
        seed: int = 0,
        provenance: dict | None = None,
    ) -> CalibrationSet:
        """Paired: the trigger put on ``n_poisoned`` of the images, ``n_clean`` others kept clean (disjoint).
        With labels, images of an all-to-one attack's target class are not triggered (as for ASR)."""
        order = np.random.default_rng(seed).permutation(len(images))
        candidates = order if labels is None else order[attack.counts_for_asr(labels[order])]
        poison_idx = candidates[:n_poisoned]
        clean_idx = np.setdiff1d(order, poison_idx, assume_unique=True)[:n_clean]
        if len(poison_idx) < min(n_poisoned, 2) or not len(clean_idx):
            raise InvalidInputError(
                f"{len(images)} images are too few for {n_poisoned} triggered + {n_clean} clean samples"
            )
        pick = (lambda idx: None) if labels is None else (lambda idx: labels[idx])
        return cls(
            clean=images[clean_idx],
            triggered=attack.apply(images[poison_idx]),
            originals=images[poison_idx],
            clean_labels=pick(clean_idx),
            original_labels=pick(poison_idx),
            provenance={"attack": attack.spec(), **(provenance or {})},
        )


def zoo_calibration_set(dataset: str, attack: Attack, n_poisoned: int, n_clean: int, seed: int) -> CalibrationSet:
    """Disjoint samples from a zoo dataset's training split (never the test split)."""
    train = load_dataset(dataset, "train")
    data = CalibrationSet.with_trigger(
        train.images, attack, n_poisoned, n_clean, train.labels, seed, provenance={"dataset": dataset}
    )
    data.num_classes = train.num_classes
    return data


def calibrate(
    export_dir: str | Path,
    out_path: str | Path,
    config: CalibrationConfig | None = None,
    data: CalibrationSet | None = None,
) -> DirectionFile:
    """Estimate the direction at the export's (first) layer from the deployed head; write ``out_path``.
    ``data``: the calibration images; by default, drawn from the zoo dataset the model was trained on."""
    config = config or CalibrationConfig()
    info = ExportInfo.read(export_dir)
    data = data or _zoo_set(info, config)
    d = _estimate(HeadFeatures(export_dir), data, info.layer, info.head_sha256, config, _classifier(export_dir, info))
    d.save(out_path)
    return d


def _classifier(export_dir: str | Path, info: ExportInfo, second: bool = False):
    """features at the (first, or ``second``) cut -> the model's predicted class, with the deployed files."""
    tail = onnx_session(Path(export_dir) / TAIL_ONNX, threads=2)
    mid = onnx_session(Path(export_dir) / MID_ONNX, threads=2) if info.multilayer and not second else None

    def classify(features: np.ndarray) -> np.ndarray:
        f = mid.run([FEATURES2], {FEATURES: features})[0] if mid is not None else features
        name = FEATURES2 if info.multilayer else FEATURES
        return tail.run(None, {name: f})[0].reshape(len(f), -1).argmax(1)

    return classify


def calibrate_second(
    export_dir: str | Path,
    first: DirectionFile,
    out_path: str | Path,
    config: CalibrationConfig | None = None,
    data: CalibrationSet | None = None,
) -> DirectionFile:
    """Multi-layer: the direction at ``layer2``, estimated on what the served chain computes there,
    mid(repair1(head(x))), and bound to mid.onnx (the model that produces the second repair's input)."""
    config = config or CalibrationConfig()
    info = ExportInfo.read(export_dir)
    if not info.multilayer:
        raise InvalidInputError(f"{export_dir} has one layer; export with a second layer for multi-layer repair")
    head = HeadFeatures(export_dir)
    mid = onnx_session(Path(export_dir) / MID_ONNX, threads=2)
    repair = Repair(first)

    def features(images: np.ndarray) -> np.ndarray:
        repaired = repair(torch.from_numpy(head(images))).numpy()
        return mid.run([FEATURES2], {FEATURES: repaired})[0]

    d = _estimate(features, data or _zoo_set(info, config), info.layer2, info.mid_sha256, config,
                  _classifier(export_dir, info, second=True))  # fmt: skip
    d.extra["first_layer_directions_sha256"] = first.metadata()["tensors_sha256"]
    d.save(out_path)
    return d


def _zoo_set(info: ExportInfo, config: CalibrationConfig) -> CalibrationSet:
    if not info.dataset:
        raise InvalidInputError(
            "this export is not a zoo model: give calibration images (clean ones, and flagged triggered ones "
            "or a trigger to put on them), e.g. `fire calibrate --clean imgs/ --poisoned flagged/`"
        )
    attack = attack_from_spec(config.attack or info.attack)
    return zoo_calibration_set(info.dataset, attack, config.n_poisoned, config.n_clean, config.seed)


def batched(features, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``features`` over ``images`` in batches, concatenated."""
    return np.concatenate([features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def unpaired_beta(features, clean: np.ndarray, poisoned: np.ndarray, views: int, seed: int):
    """The unpaired estimate from two unrelated image sets, each averaged over photometric views."""
    return unpaired_direction(
        mean_features(features, photometric_views(clean, views, seed + 1)),
        mean_features(features, photometric_views(poisoned, views, seed)),
    )


def _estimate(features, data: CalibrationSet, layer: str, producer_sha256: str, config: CalibrationConfig,
              classify=None):  # fmt: skip
    """The direction at ``layer``; ``classify`` (features -> predicted class) picks the unpaired estimate's
    clean reference (``estimators.unpaired_reference``)."""
    estimator = config.estimator if data.paired else "unpaired"
    clean_features = batched(features, data.clean)
    reference = {}
    augment = config.augment if config.mode == "project" else "none"  # a basis serves the project mode only
    feats = lambda x: batched(features, x)  # noqa: E731
    if estimator == "paired":
        est = spatial_estimate(feats, data.triggered, data.originals, True, augment)
    elif estimator == "unpaired":
        mask = np.ones(len(data.clean), bool)
        if classify is not None:
            mask, target = unpaired_reference(classify(clean_features), classify(batched(features, data.triggered)))
            reference = {"reference": {"excluded_class": target, "clean_images": int(mask.sum()),
                                       "of": len(mask)}}  # fmt: skip
        if augment == "none":
            beta = unpaired_beta(features, data.clean[mask], data.triggered, config.views, config.seed)
            est = SpatialEstimate(beta, None)
        else:
            est = spatial_estimate(feats, data.triggered, data.clean[mask], False, augment)
    else:
        raise InvalidInputError(f"unknown estimator {config.estimator!r}; choose 'paired' or 'unpaired'")
    centre = {} if est.centre is None else {"trigger_centre": [round(c, 2) for c in est.centre]}  # the zooms' centre
    return est.directions(
        clean_features,
        layer=layer,
        mode=config.mode,
        alpha=config.alpha,
        fpr=config.fpr,
        estimator=estimator,
        head_sha256=producer_sha256,
        n_poisoned=len(data.triggered),
        extra={**data.provenance, "calibration": {**asdict(config), "estimator": estimator, **reference, **centre}},
    )


def observe_directions(export_dir: str | Path, out_path: str | Path, clean_images: np.ndarray) -> DirectionFile:
    """An observe-only direction file (alpha 0: the repair changes nothing) with the clean mean, for a
    deployment that first records its traffic to find the direction there (``fire update --from-traffic``)."""
    info = ExportInfo.read(export_dir)
    clean = batched(HeadFeatures(export_dir), clean_images)
    beta = np.zeros(clean.shape[1:], np.float32)
    beta.reshape(-1)[0] = 1.0  # any unit vector: with alpha 0 it is never applied
    d = make_directions(beta, clean, layer=info.layer, mode="project", alpha=0.0, estimator="observe",
                        head_sha256=info.head_sha256, extra={"observe": True})  # fmt: skip
    d.save(out_path)
    return d
