"""Hot reload without model control: the repair model watches its own direction file.

``DirectionWatcher`` holds the live ``Repair`` and polls the file (inode, size, mtime). When it changes,
the new file is loaded and validated against the deployment (feature shape, sha256 of the producing
model) before it replaces the old one; a file that fails validation is reported and ignored, and the
old directions keep serving. Swapping is one reference assignment, so every request is repaired by one
file or the other, never a mix. Writers replace the file atomically (write a temp file, rename it).

With this, the server needs no network model control at all (``--model-control-mode=none``): who may
change what a protected model serves is decided by who may write its repository directory.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fire_backend.directions import DirectionFile, DirectionFileError
from fire_backend.formula import NumpyRepair


@dataclass(frozen=True)
class Loaded:
    repair: object  # NumpyRepair on CPU, fire_backend.repair.Repair (torch) on a GPU
    directions: DirectionFile
    stamp: tuple[int, int, int]  # (inode, size, mtime_ns) of the file it came from


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class DirectionWatcher:
    """The live repair of one repair model, reloaded when its direction file is replaced."""

    def __init__(
        self,
        path: str | Path,
        feature_shape: tuple[int, ...],
        producer_sha256: str,
        mode: str | None = None,
        make_repair: Callable[[DirectionFile, str | None], object] = NumpyRepair,
        on_change: Callable[[Loaded], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ):
        self.path, self.feature_shape, self.producer_sha256 = Path(path), tuple(feature_shape), producer_sha256
        self.mode, self.make_repair = mode, make_repair
        self.on_change, self.on_error = on_change, on_error
        self.current = self._load()  # raises on a bad file: the model does not load (fail closed)
        self._refused: tuple[int, int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _load(self) -> Loaded:
        try:
            before = _stamp(self.path)
        except FileNotFoundError:
            raise DirectionFileError(self.path, "not found") from None
        d = DirectionFile.load(self.path, feature_shape=self.feature_shape, head_sha256=self.producer_sha256)
        return Loaded(self.make_repair(d, self.mode), d, before)

    def check(self) -> bool:
        """Reload if the file changed; True when a new file took effect."""
        try:
            stamp = _stamp(self.path)
        except OSError as e:  # the file is being replaced or was removed: keep serving what we have
            self._report(e)
            return False
        if stamp in (self.current.stamp, self._refused):
            return False
        try:
            loaded = self._load()
        except Exception as e:  # noqa: BLE001 - whatever a replaced file raises, keep serving and watching
            self._refused = stamp
            self._report(e)
            return False
        self.current = loaded
        if self.on_change:
            self.on_change(loaded)
        return True

    def _report(self, error: Exception) -> None:
        if self.on_error:
            self.on_error(error)

    def start(self, interval_s: float) -> DirectionWatcher:
        def run() -> None:
            while not self._stop.wait(interval_s):
                self.check()

        self._thread = threading.Thread(target=run, name="fire-direction-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
