"""``fire update --from-traffic``: propose a direction from what the server saw, show its expected
effect, and deploy it through the validated hot-reload path when the checks pass (``--auto``) or an
operator approves (``--approve``). Rollback as for any update (``fire rollback``).

The traffic statistics are the tail's (``fire_backend.traffic``): features after the deployed repair.
Traffic calibration therefore starts from an observe-only direction (``fire protect --observe``: alpha
0, the repair changes nothing); with another direction deployed the statistics are of repaired
features, and a proposal from them is refused unless forced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.traffic import Proposal, TrafficConfig, propose
from fire_backend.directions import DirectionFile
from fire_backend.errors import InvalidInputError
from fire_backend.names import (
    DIRECTIONS_FILE,
    FEATURES,
    MODEL_VERSION,
    PARAM_PREPROCESS,
    TRAFFIC_FILE,
    WHOLE_ONNX,
)
from fire_backend.onnx_runtime import onnx_session
from fire_backend.traffic import TrafficStats
from modelio.preprocess import Preprocess
from serving.configs import read_config
from serving.repository import producer_of, repair_model_of
from serving.streaming import DirectionStream


@dataclass
class TrafficUpdate:
    proposal: Proposal
    deployed_version: int | None
    traffic_file: Path
    samples: int  # recorded in the statistics
    unrecordable: int = 0  # seen but not recordable (non-finite, or beyond what float16 holds)


def tail_of(repository: Path, model: str, repair: str) -> str:
    """The step that reads the repair model's output in the protected ensemble."""
    for step in read_config(repository / model).ensemble_scheduling.step:
        if step.model_name != repair and any(v.endswith(f"{repair}_out") for v in step.input_map.values()):
            return step.model_name
    raise InvalidInputError(f"{model}: no step reads {repair}'s output")


def update_from_traffic(
    repository: str | Path,
    model: str,
    clean_images: np.ndarray,
    clean_labels: np.ndarray | None = None,
    cfg: TrafficConfig | None = None,
    deploy: str = "never",  # "never", "auto" (when every check passes) or "approve" (an operator said so)
    metrics_url: str | None = None,
    force: bool = False,
) -> TrafficUpdate:
    repository = Path(repository)
    repair = repair_model_of(repository, model)
    current = DirectionFile.load(repository / repair / MODEL_VERSION / DIRECTIONS_FILE)
    if current.alpha != 0 and current.estimator != "observe" and not force:
        raise InvalidInputError(
            f"{repair} serves a repair that changes features (alpha {current.alpha}): the traffic statistics are "
            "of repaired features. Calibrate from traffic with an observe-only direction deployed "
            "(fire protect --observe), or pass --force"
        )
    tail = tail_of(repository, model, repair)
    traffic_file = repository / tail / TRAFFIC_FILE
    if not traffic_file.is_file():
        raise InvalidInputError(f"no traffic recorded yet ({traffic_file}); send traffic to {model} first")
    stats, _ = TrafficStats.load(traffic_file)
    producer = producer_of(repository, repair)
    head = onnx_session(repository / producer / MODEL_VERSION / WHOLE_ONNX, threads=2)
    tail_session = onnx_session(repository / tail / MODEL_VERSION / WHOLE_ONNX, threads=2)
    pre = Preprocess.from_dict(json.loads(read_config(repository / repair).parameters[PARAM_PREPROCESS].string_value))

    def predict(features: np.ndarray) -> np.ndarray:
        out = [tail_session.run(None, {FEATURES: features[i : i + 256]})[0] for i in range(0, len(features), 256)]
        return np.concatenate(out).reshape(len(features), -1).argmax(1)

    head_input = head.get_inputs()[0].name
    clean = np.concatenate([head.run([FEATURES], {head_input: pre.apply(clean_images[i : i + 256])})[0]
                            for i in range(0, len(clean_images), 256)])  # fmt: skip
    proposal = propose(stats, clean, predict(clean), predict, layer=current.layer, head_sha256=current.head_sha256,
                       clean_labels=clean_labels, cfg=cfg)  # fmt: skip
    version = None
    if proposal.directions is not None and (deploy == "approve" or (deploy == "auto" and proposal.deployable)):
        stream = DirectionStream(metrics_url, repository, repair)
        event = {"source": "traffic", "target": proposal.targets or proposal.target, "score": proposal.score,
                 "samples": stats.total,
                 "checks": proposal.checks, "approved": deploy == "approve"}  # fmt: skip
        version = stream.publish(proposal.directions, event)
    return TrafficUpdate(proposal, version, traffic_file, stats.total, stats.unrecordable)
