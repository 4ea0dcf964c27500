"""A direction file as a model serves it (import only inside a Triton stub): loaded and validated at
start (a missing or invalid file raises, so the model does not load: fail closed), watched and swapped
when a replaced file validates (``fire_backend.reloader``), with FIRE's metrics following the file in
use. Shared by the repair model and the folded model, which watch the same file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import triton_python_backend_utils as pb_utils

from fire_backend.names import (
    METRICS_DETAILED,
    METRICS_OFF,
    METRICS_ON,
    PARAM_DIRECTIONS_POLL,
    PARAM_METRICS,
    PARAM_METRICS_INTERVAL,
    PARAM_MODE,
)
from fire_backend.reloader import DirectionWatcher
from fire_backend.triton.metrics import RepairMetrics


class ServedDirections:
    def __init__(self, model: str, path: Path, feature_shape: tuple[int, ...], producer_sha256: str,
                 params: dict[str, str], make_repair: Callable) -> None:  # fmt: skip
        self.model, self.metrics = model, None
        self.watcher = DirectionWatcher(
            path,
            feature_shape,
            producer_sha256,
            mode=params.get(PARAM_MODE) or None,
            make_repair=make_repair,
            on_change=self._changed,
            on_error=self._refused,
        )
        level = params.get(PARAM_METRICS, METRICS_ON)
        if level != METRICS_OFF:
            interval = float(params.get(PARAM_METRICS_INTERVAL, "1.0"))
            self.metrics = RepairMetrics(model, self.watcher.current.directions, interval, level == METRICS_DETAILED)
        poll = float(params.get(PARAM_DIRECTIONS_POLL, "1.0"))
        if poll > 0:
            self.watcher.start(poll)

    @property
    def repair(self):
        """The repair of the file in use: take it once per request, so a request sees one file only."""
        return self.watcher.current.repair

    def record(self, scores, repair) -> None:
        if self.metrics:
            self.metrics.record(scores, repair)

    def record_rejected(self) -> None:
        if self.metrics:
            self.metrics.record_rejected()

    def _changed(self, loaded) -> None:
        pb_utils.Logger.log_info(f"{self.model}: now serving direction file {loaded.directions.created} "
                                 f"(version {loaded.directions.version})")  # fmt: skip
        if self.metrics:
            self.metrics.use(loaded.directions)

    def _refused(self, error: Exception) -> None:
        pb_utils.Logger.log_error(f"{self.model}: kept the previous directions, refused the new file: {error}")
        if self.metrics:
            self.metrics.record_reload_failure()

    def close(self) -> None:
        self.watcher.stop()
        if self.metrics:
            self.metrics.close()
