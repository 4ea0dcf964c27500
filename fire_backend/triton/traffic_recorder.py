"""The tail's traffic recorder (import only inside a Triton stub): feeds ``fire_backend.traffic.TrafficStats``
with every batch the tail serves (its input features, the class it predicts, the source the gateway
named) and saves them next to the model every few seconds, where ``fire update --from-traffic`` reads
them. At start it continues from the file it finds there (a restart loses at most the last few
seconds); a file of another format or model is set aside as ``<file>.stale``.

Exports the number of samples recorded as ``fire_traffic_samples_total``; with detailed metrics (see
``fire_backend.triton.metrics``) also, per predicted class, ``fire_traffic_class_samples{class="k"}``:
off by default, since the metrics port has no authentication and per-class counts tell a prober
where its requests landed."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from fire_backend.names import METRICS_DETAILED, PARAM_METRICS, PARAM_TRAFFIC_BUDGET, TRAFFIC_FILE
from fire_backend.traffic import DEFAULT_BUDGET, TrafficStats, TrafficStatsError
from fire_backend.triton.common import PeriodicFlush


def recorder_for(args: dict, config: dict, params: dict, features: str, classes: str) -> TrafficRecorder:
    """The recorder of a tail whose parameters ask for one (``PARAM_TRAFFIC_STATS``): sized from the
    config's dims of its ``features`` input and ``classes`` output (the export measured them; a model
    file's may be symbolic)."""
    dims = {t["name"]: [int(d) for d in t["dims"]] for t in config["input"] + config["output"]}
    feature_dims, class_dims = dims[features], dims[classes]
    if min(feature_dims + class_dims) < 1:
        raise ValueError(f"{args['model_name']}: recording traffic needs fixed feature and output dims, the "
                         f"config has {feature_dims} and {class_dims}")  # fmt: skip
    path = Path(args["model_repository"]) / TRAFFIC_FILE
    budget = int(params.get(PARAM_TRAFFIC_BUDGET, str(DEFAULT_BUDGET)))
    return TrafficRecorder(args["model_name"], path, int(np.prod(class_dims)), int(np.prod(feature_dims)), budget,
                           params.get(PARAM_METRICS) == METRICS_DETAILED)  # fmt: skip


def _resume(path: Path, num_classes: int, feature_size: int, budget: int) -> TrafficStats:
    if path.is_file():
        try:
            stats, _ = TrafficStats.load(path)
            if stats.fits(num_classes, feature_size):
                pb_utils.Logger.log_info(f"{path}: continuing from {stats.total} recorded samples")
                return stats
            reason = "recorded for another model"
        except TrafficStatsError as e:
            reason = str(e)
        path.replace(path.with_name(path.name + ".stale"))
        pb_utils.Logger.log_warn(f"{path}: set aside as .stale ({reason}); recording starts afresh")
    return TrafficStats(num_classes, feature_size, budget)


class TrafficRecorder(PeriodicFlush):
    def __init__(self, model: str, path: Path, num_classes: int, feature_size: int, budget: int,
                 detailed: bool = False, interval: float = 5.0):  # fmt: skip
        self.path = path
        self.stats = _resume(path, num_classes, feature_size, budget)
        self._lock, self._dirty = threading.Lock(), False
        self._family = pb_utils.MetricFamily(
            name="fire_traffic_samples_total", description="Samples recorded for traffic calibration",
            kind=pb_utils.MetricFamily.COUNTER,
        )  # fmt: skip
        self._metric = self._family.Metric(labels={"model": model})
        self._per_class = []
        if detailed:
            self._classes = pb_utils.MetricFamily(
                name="fire_traffic_class_samples", description="Samples recorded per predicted class",
                kind=pb_utils.MetricFamily.GAUGE,
            )  # fmt: skip
            self._per_class = [
                self._classes.Metric(labels={"model": model, "class": str(k)}) for k in range(num_classes)
            ]
        self._pending = 0
        self._start_flushing(interval, "fire-traffic")

    def record(self, features: np.ndarray, logits: np.ndarray, sources: list[str]) -> None:
        predicted = logits.reshape(len(logits), -1).argmax(axis=1)
        with self._lock:
            self.stats.update(features, predicted, sources)
            self._pending += len(features)
            self._dirty = True

    def flush(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            self.stats.save(self.path)
            pending, self._pending, self._dirty = self._pending, 0, False
            counts = self.stats.counts.copy()
        for metric, n in zip(self._per_class, counts, strict=False):
            metric.set(float(n))
        if pending:  # the total last: a scrape that sees it sees the per-class counts behind it
            self._metric.increment(float(pending))
