"""A watchdog that brings a crashed Python-backend stub back.

With Triton 2.51 a killed stub is *not* restarted by the server: the model stays listed READY and every
request to it fails with "Stub process ... is not healthy" (an error, never an unprotected answer)
until the model is loaded again. The watchdog polls the server's stubs and reloads a model whose stub
died (model control, with the admin key)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from serving.admin import ControlError, load_model
from serving.procfs import stubs


@dataclass
class Recovery:
    model: str
    detected_at: float
    recovered_at: float | None = None
    error: str | None = None


@dataclass
class StubWatchdog:
    """Polls the server's stub processes; reloads a model whose stub died. Use as a context manager."""

    server_pid: int
    http_url: str
    admin_key: str
    models: set[str] = field(default_factory=set)  # models to keep up even if no stub of theirs is seen alive
    interval_s: float = 0.25
    recoveries: list[Recovery] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fire-stub-watchdog", daemon=True)

    def _run(self) -> None:
        known = self.models | set(stubs(self.server_pid).values())
        while not self._stop.wait(self.interval_s):
            lost = sorted(known - set(stubs(self.server_pid).values()))
            for model in lost:
                r = Recovery(model, time.time())
                self.recoveries.append(r)
                try:
                    load_model(self.http_url, self.admin_key, model)
                    r.recovered_at = time.time()
                except (ControlError, OSError) as e:
                    r.error = str(e)
            alive = set(stubs(self.server_pid).values())
            known.difference_update(m for m in lost if m not in alive)  # not retried until a stub of it is seen
            known |= alive

    def __enter__(self) -> StubWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
