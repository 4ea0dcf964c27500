"""The tail's traffic recorder (import only inside a Triton stub): feeds ``fire_backend.traffic.TrafficStats``
with every batch the tail serves (its input features, the class it predicts) and saves them next to
the model every few seconds, where ``fire update --from-traffic`` reads them. Exports the number of
samples recorded as ``fire_traffic_samples_total`` and, per predicted class, as
``fire_traffic_class_samples{class="k"}`` (a backdoor's target class gains a share)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from fire_backend.traffic import TrafficStats
from fire_backend.triton.common import PeriodicFlush


class TrafficRecorder(PeriodicFlush):
    def __init__(self, model: str, path: Path, num_classes: int, feature_size: int, budget: int, interval: float = 5.0):
        self.path, self.stats = path, TrafficStats(num_classes, feature_size, budget)
        self._lock, self._dirty = threading.Lock(), False
        self._family = pb_utils.MetricFamily(
            name="fire_traffic_samples_total", description="Samples recorded for traffic calibration",
            kind=pb_utils.MetricFamily.COUNTER,
        )  # fmt: skip
        self._metric = self._family.Metric(labels={"model": model})
        self._classes = pb_utils.MetricFamily(
            name="fire_traffic_class_samples", description="Samples recorded per predicted class",
            kind=pb_utils.MetricFamily.GAUGE,
        )  # fmt: skip
        self._per_class = [self._classes.Metric(labels={"model": model, "class": str(k)}) for k in range(num_classes)]
        self._pending = 0
        self._start_flushing(interval, "fire-traffic")

    def record(self, features: np.ndarray, logits: np.ndarray) -> None:
        predicted = logits.reshape(len(logits), -1).argmax(axis=1)
        with self._lock:
            self.stats.update(features, predicted)
            self._pending += len(features)
            self._dirty = True

    def flush(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            self.stats.save(self.path)
            pending, self._pending, self._dirty = self._pending, 0, False
            counts = self.stats.counts.copy()
        if pending:
            self._metric.increment(float(pending))
        for metric, n in zip(self._per_class, counts, strict=True):
            metric.set(float(n))
