"""What every runtime baseline is: fitted once on the defender's clean images, then asked about inputs.

A defense answers a batch of uint8 NHWC images with the labels it serves (-1: the input is rejected)
and, for a detector, a suspicion score per input (higher: more likely triggered), so it is reported
both ways: as detection (TPR at 1 % FPR, AUROC) and as "reject" (CA / ASR / PA with rejected inputs
counted as not correct). Every baseline gets the same model, the same clean images and the same
evaluation split as FIRE. Models are zoo models: float NCHW input in [0, 1].
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from zoo.data import to_tensor_batch

REJECTED = -1
FPR = 0.01  # detectors: the share of clean inputs they may reject (thresholds set on the defender's images)


@dataclass
class Outcome:
    labels: np.ndarray  # served label per input, REJECTED where refused
    scores: np.ndarray | None = None  # suspicion per input (detectors)


@dataclass
class Context:
    """What a defender holds: the deployed model and clean images (with labels) it may use."""

    model: nn.Module
    clean: np.ndarray  # uint8 NHWC
    clean_labels: np.ndarray
    seed: int = 0


class Defense(ABC):
    name: str
    kind: str  # "detect" (rejects), "restore" (serves another label), "model" (a changed model)

    @abstractmethod
    def fit(self, ctx: Context) -> None: ...

    @abstractmethod
    def __call__(self, images: np.ndarray) -> Outcome: ...


@torch.inference_mode()
def logits(model: nn.Module, x: np.ndarray, batch: int = 500) -> torch.Tensor:
    """The model's logits for float NCHW inputs in [0, 1] (any range: superimposed inputs exceed it)."""
    model.eval()
    return torch.cat([model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch]))) for i in range(0, len(x), batch)])


def predict(model: nn.Module, images: np.ndarray) -> np.ndarray:
    return logits(model, to_tensor_batch(images)).argmax(1).numpy()


def threshold_at_fpr(clean_scores: np.ndarray, fpr: float = FPR) -> float:
    """The score above which at most ``fpr`` of the clean inputs lie."""
    return float(np.quantile(clean_scores, 1 - fpr))


def auroc(clean_scores: np.ndarray, triggered_scores: np.ndarray) -> float:
    """P(score of a triggered input > score of a clean one), ties half (the Mann-Whitney statistic)."""
    both = np.concatenate([clean_scores, triggered_scores])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    for value in np.unique(both):  # average ranks over ties
        tie = both == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    n_c, n_t = len(clean_scores), len(triggered_scores)
    return float((ranks[n_c:].sum() - n_t * (n_t + 1) / 2) / (n_c * n_t))


def detection(clean: Outcome, clean_ok: np.ndarray, triggered: Outcome, attacked: np.ndarray) -> tuple[float, float]:
    """A detector's (TPR % at its threshold, AUROC), the way SCALE-UP's and STRIP's authors evaluate: over
    the triggered inputs the undefended model sends to the attacker's class (``attacked``: an input whose
    trigger fails is no attack to detect) against the clean inputs it classifies correctly (``clean_ok``).
    NaN when no triggered input succeeds."""
    if not attacked.any():
        return float("nan"), float("nan")
    tpr = 100 * float((triggered.labels[attacked] == REJECTED).mean())
    return tpr, auroc(clean.scores[clean_ok], triggered.scores[attacked])


def timed(defense: Defense, images: np.ndarray) -> tuple[Outcome, float]:
    """The defense's answer to ``images`` and its wall time per image in ms (in process, every core)."""
    t0 = time.perf_counter()
    outcome = defense(images)
    return outcome, 1e3 * (time.perf_counter() - t0) / max(len(images), 1)
