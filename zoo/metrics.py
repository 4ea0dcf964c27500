"""CA / ASR / PA for any predictor: local torch, onnxruntime, or a model behind Triton.

- CA: accuracy on clean test images.
- ASR: share of triggered test images classified as the attacker's label for them (all-to-one: the
  target class, counted over images whose true class is not the target; all-to-all: y + 1 mod K).
- PA: share of those triggered images classified as their true class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from zoo.attacks import Attack
from zoo.data import Split, to_tensor_batch

Predictor = Callable[[np.ndarray], np.ndarray]  # float32 NCHW [0,1] -> logits (N, K)


@dataclass(frozen=True)
class BackdoorMetrics:
    ca: float
    asr: float
    pa: float
    n_clean: int
    n_triggered: int

    def as_row(self) -> dict[str, float]:
        return {"CA": 100 * self.ca, "ASR": 100 * self.asr, "PA": 100 * self.pa}


def predict_labels(
    predict: Predictor, images: np.ndarray, batch_size: int = 256, desc: str = "", prepare=to_tensor_batch
) -> np.ndarray:
    """Labels for uint8 NHWC images; ``prepare`` turns them into the predictor's input (default: the
    zoo models' float32 NCHW pixels in [0, 1])."""
    out = []
    starts = range(0, len(images), batch_size)
    for i in tqdm(starts, desc=desc, disable=None if desc else True, leave=False, unit="batch"):
        logits = np.asarray(predict(prepare(images[i : i + batch_size])))
        out.append(logits.reshape(len(logits), -1).argmax(axis=1))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def backdoor_metrics(
    predict: Predictor, test: Split, attack: Attack, batch_size: int = 256, desc: str = "", prepare=to_tensor_batch
) -> BackdoorMetrics:
    clean_pred = predict_labels(predict, test.images, batch_size, f"{desc} clean" if desc else "", prepare)
    keep = attack.counts_for_asr(test.labels)
    triggered = attack.apply(test.images[keep])
    trig_pred = predict_labels(predict, triggered, batch_size, f"{desc} triggered" if desc else "", prepare)
    wanted = attack.target_labels(test.labels[keep], test.num_classes)
    return BackdoorMetrics(
        ca=float((clean_pred == test.labels).mean()),
        asr=float((trig_pred == wanted).mean()),
        pa=float((trig_pred == test.labels[keep]).mean()),
        n_clean=len(test),
        n_triggered=int(keep.sum()),
    )


def format_table(rows: dict[str, BackdoorMetrics]) -> str:
    """A markdown table, one row per named setting."""
    lines = ["| model | CA % | ASR % | PA % | clean n | triggered n |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in rows.items():
        lines.append(
            f"| {name} | {100 * m.ca:.2f} | {100 * m.asr:.2f} | {100 * m.pa:.2f} | {m.n_clean} | {m.n_triggered} |"
        )
    return "\n".join(lines)
