"""FIRE's own Prometheus metrics, through the Python backend's custom-metrics API (import only inside
a Triton stub). They appear on the server's metrics endpoint (``:8002/metrics``) next to Triton's own,
labelled with the repair model's name:

- ``fire_repair_samples_total``            samples through the repair
- ``fire_repair_rejected_requests_total``  requests refused (NaN/Inf, wrong shape or dtype)
- with detailed metrics only (parameter ``METRICS`` = ``detailed``; off by default because Triton's
  metrics port has no authentication, and per-sample scores tell a prober how close its trigger
  variant comes to the direction):
  ``fire_repair_changed_samples_total``    samples the repair moved (project: s > 0, every sample when
                                           the file's project_gate is off; gated: s > tau; subtract: every
                                           sample)
  ``fire_projection_score_bucket{le=...}``, ``_count``, ``_sum``: the distribution of s(x) / |beta|
  per sample (clean inputs near 0, triggered ones near 1) in Prometheus' histogram layout: cumulative
  bucket counters, so ``histogram_quantile`` works on them
- ``fire_direction_version``, ``fire_direction_updates``: the direction file in use (``fire update``
  writes version + 1), ``fire_direction_created_timestamp_seconds`` and ``fire_direction_checksum`` (the
  first 32 bits of its checksum: ``fire reload`` waits for it to show the new file)
- ``fire_direction_reload_failures_total``: replaced direction files the repair model refused (it kept
  serving the previous one)

Every metric call from a Python-backend stub is a round trip to the server (~0.1 ms measured here), so
nothing is sent per request: counts accumulate in the stub and a background thread flushes them every
``interval`` seconds (parameter ``METRICS_INTERVAL_S``, default 1), ~17 calls per flush. A flush
publishes the totals last, so a scrape showing N samples in ``fire_repair_samples_total`` also shows
their scores and changed counts.
"""

from __future__ import annotations

import threading
from datetime import datetime

import numpy as np
import triton_python_backend_utils as pb_utils

from fire_backend.directions import DirectionFile
from fire_backend.triton.common import PeriodicFlush

SCORE_BUCKETS = [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0]


class RepairMetrics(PeriodicFlush):
    def __init__(self, model: str, directions: DirectionFile, interval: float = 1.0, detailed: bool = False):
        family = pb_utils.MetricFamily
        labels = {"model": model}
        self._families = []  # families must outlive their metrics: keep them on the instance

        def metric(name: str, help_text: str, kind, extra: dict | None = None):
            fam = next((f for n, f in self._families if n == name), None)
            if fam is None:
                fam = family(name=name, description=help_text, kind=kind)
                self._families.append((name, fam))
            return fam.Metric(labels={**labels, **(extra or {})})

        counter = family.COUNTER
        self.detailed = detailed
        # the totals are registered first (a scrape reads families in registration order, prometheus-cpp's
        # Registry::Collect) and flushed last (``flush``): so a scrape that counts N samples holds their scores
        self.samples = metric("fire_repair_samples_total", "Samples through the FIRE repair", counter)
        self.rejected = metric("fire_repair_rejected_requests_total", "Requests the FIRE repair refused", counter)
        if detailed:  # per-sample scores: an oracle for whoever reads the (unauthenticated) metrics port
            self.changed = metric("fire_repair_changed_samples_total", "Samples the FIRE repair moved", counter)
            help_text = "Projection score s(x) / |beta| per sample (clean near 0, triggered near 1)"
            self.buckets = [
                metric("fire_projection_score_bucket", help_text, counter, {"le": repr(le)}) for le in SCORE_BUCKETS
            ] + [metric("fire_projection_score_bucket", help_text, counter, {"le": "+Inf"})]
            self.count = metric("fire_projection_score_count", "Samples scored", counter)
            self.sum = metric("fire_projection_score_sum", "Sum of the scores", family.GAUGE)  # may go down
        self.reload_failures = metric(
            "fire_direction_reload_failures_total", "Replaced direction files the repair model refused", counter
        )
        self.gauges = {
            name: metric(name, text, family.GAUGE)
            for name, text in (
                ("fire_direction_version", "Version of the direction file in use"),
                ("fire_direction_updates", "Streaming updates behind the direction file in use"),
                ("fire_direction_created_timestamp_seconds", "When the direction file in use was written"),
                ("fire_direction_checksum", "First 32 bits of the direction file's checksum"),
            )
        }
        self.use(directions)
        self.edges = np.asarray(SCORE_BUCKETS)
        self._lock = threading.Lock()
        self._pending = self._zero()
        self._start_flushing(interval, "fire-metrics")

    def use(self, directions: DirectionFile) -> None:
        """The direction file now in use: the gauges show it."""
        for name, value in (
            ("fire_direction_version", directions.version),
            ("fire_direction_updates", directions.updates),
            ("fire_direction_created_timestamp_seconds", datetime.fromisoformat(directions.created).timestamp()),
            ("fire_direction_checksum", directions.checksum32),
        ):
            self.gauges[name].set(float(value))

    def record_reload_failure(self) -> None:
        self.reload_failures.increment(1.0)

    def _zero(self) -> dict:
        return {"samples": 0, "changed": 0, "rejected": 0, "sum": 0.0, "hist": np.zeros(len(SCORE_BUCKETS) + 1)}

    def record(self, scores, repair) -> None:
        """Scores of one request (a NumPy array, or a torch tensor on any device), read with the repair
        that served it."""
        if not self.detailed:
            with self._lock:
                self._pending["samples"] += len(scores)
            return
        if hasattr(scores, "cpu"):  # a torch tensor (GPU repair): one copy to the host, then NumPy only
            scores = scores.detach().cpu().numpy()
        scores = np.asarray(scores, dtype=np.float64)
        ratio = scores / repair.beta_norm
        # bucket i counts ratio <= SCORE_BUCKETS[i] (first match), the last one everything above
        hist = np.bincount(np.searchsorted(self.edges, ratio, side="left"), minlength=len(SCORE_BUCKETS) + 1)
        changed = int((scores > repair.params.tau).sum())
        with self._lock:
            p = self._pending
            p["samples"] += len(scores)
            p["changed"] += changed
            p["sum"] += float(ratio.sum())
            p["hist"] += hist

    def record_rejected(self) -> None:
        with self._lock:
            self._pending["rejected"] += 1

    def flush(self) -> None:
        with self._lock:
            p, self._pending = self._pending, self._zero()
        if not (p["samples"] or p["rejected"]):
            return
        # the details first, the totals last: a scrape that sees a flush's samples in
        # fire_repair_samples_total also sees its scores (each call is its own round trip)
        if p["samples"] and self.detailed:
            for metric, value in zip(self.buckets, np.cumsum(p["hist"]).tolist(), strict=True):
                if value:
                    metric.increment(float(value))
            self.sum.increment(p["sum"])
            self.count.increment(float(p["samples"]))
            if p["changed"]:
                self.changed.increment(float(p["changed"]))
        for metric, value in ((self.rejected, p["rejected"]), (self.samples, p["samples"])):
            if value:
                metric.increment(float(value))
