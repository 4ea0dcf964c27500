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


class TrafficRecorder:
    def __init__(self, model: str, path: Path, num_classes: int, feature_size: int, budget: int, interval: float):
        self.path, self.stats = path, TrafficStats(num_classes, feature_size, budget)
        self._lock, self._stop, self._dirty = threading.Lock(), threading.Event(), False
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
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True, name="fire-traffic")
        self._thread.start()

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

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()
