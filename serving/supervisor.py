"""Keep a server serving: ``fire serve`` (and the container) run tritonserver under this supervisor.

It restarts the server when it exits, and, without network model control (the default), also when one
of its Python stubs dies (Triton 2.51 does not restart a stub; its model would fail every request). While
the server restarts, nothing answers on its ports: clients get connection errors, never an unprotected
answer. It never gives up: a server that keeps dying (a request that crashes it, sent again and again)
is restarted after a delay that doubles with each restart within ``window_s`` (from ``backoff_s`` up to
``max_backoff_s``) and falls back once it has served for ``window_s``; a start that fails is retried
the same way. So an attacker who can crash the server can slow it down, not take it away.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.procfs import stubs
from serving.server import CRASHED_GRACE_S, ServerConfig, ServerError, TritonServer


@dataclass
class Supervisor:
    config: ServerConfig
    window_s: float = 300.0  # restarts within this window count towards the backoff
    backoff_s: float = 1.0  # delay before the second restart within the window (the first is immediate)
    max_backoff_s: float = 60.0
    poll_s: float = 0.5
    report: Callable[[str], None] = print
    restarts: list[float] = field(default_factory=list)
    server: TritonServer | None = None
    # the models found short of their configured stubs at the last start (``expected_stubs``)
    _short: set[str] = field(default_factory=set, init=False, repr=False)

    def expected_stubs(self, server: TritonServer) -> Counter[str]:
        """Stubs per model the running server must keep: as many as its parsed configs say (one per instance
        of a Python-backend model), so one that died before this first look is caught all the same, and at
        least as many as are alive now. A model found short at two starts in a row is held to what runs
        (the configs and the processes disagree: a restart would not mend it), and that is reported."""
        seen = Counter(stubs(server.process.pid).values())
        try:
            configured = server.python_stub_counts()
        except ServerError as e:  # the server went meanwhile (the first poll sees it exit), or does not answer
            self.report(f"watching the {sum(seen.values())} stub(s) seen: {e}")
            configured = {}
        short = {m for m, n in configured.items() if seen[m] < n}
        for m in sorted(short & self._short):
            self.report(f"{m}: {seen[m]} stub(s) at two starts in a row, its config says {configured[m]}: "
                        f"keeping {seen[m]}")  # fmt: skip
            configured[m] = seen[m]
        self._short = short
        return Counter({m: max(seen[m], configured.get(m, 0)) for m in set(seen) | set(configured)})

    def _why_restart(self, server: TritonServer, expected: Counter[str]) -> str | None:
        code = server.process.poll()
        if code is not None:
            return f"tritonserver exited with code {code}"
        if expected:  # empty with model control: the watchdog reloads instead
            alive = Counter(stubs(server.process.pid).values())
            lost = {m: n - alive[m] for m, n in expected.items() if alive[m] < n}
            if lost:
                return f"{sum(lost.values())} Python-backend stub(s) died ({', '.join(sorted(lost))})"
        return None

    def delay(self) -> float:
        """How long to wait before the next restart: 0 for the first within the window, then doubling."""
        recent = len(self.restarts)
        return 0.0 if recent <= 1 else min(self.max_backoff_s, self.backoff_s * 2 ** (recent - 2))

    def _note_restart(self) -> None:
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < self.window_s] + [now]

    def _start(self, stop: threading.Event) -> TritonServer | None:
        """Start the server, retrying failed starts with backoff; None if ``stop`` was set meanwhile."""
        while not stop.is_set():
            try:
                self.server = TritonServer(self.config).start()
                return self.server
            except ServerError as e:
                if not self.restarts:  # the very first start: a configuration problem, say so at once
                    raise
                self._note_restart()
                self.report(f"restart failed: {e}\n{e.details}\nretrying in {self.delay():.0f} s")
                if stop.wait(self.delay()):
                    return None
        return None

    def run(self, stop: threading.Event, ready: Callable[[TritonServer], None] | None = None) -> int:
        """Serve until ``stop`` is set; the exit code is 0."""
        server = self._start(stop)
        try:
            while server is not None:
                if ready:
                    ready(server)
                expected = self.expected_stubs(server) if self.config.model_control == "none" else Counter()
                why = None
                while why is None and not stop.wait(self.poll_s):
                    why = self._why_restart(server, expected)
                if why is None:
                    return 0
                self._note_restart()
                self.report(f"{why}; log: {server.log_path}\n{server.log_tail(15)}")
                server.close(timeout=CRASHED_GRACE_S)  # a crashed server: no clean unload to wait for
                self.server = None
                wait = self.delay()
                self.report(f"restarting tritonserver in {wait:.0f} s (restart {len(self.restarts)} within "
                            f"{self.window_s:.0f} s)")  # fmt: skip
                if stop.wait(wait):
                    return 0
                server = self._start(stop)
            return 0
        finally:
            if self.server is not None:
                self.server.close()
