"""Keep a server serving: ``fire serve`` (and the container) run tritonserver under this supervisor.

It restarts the server when it exits, and, without network model control (the default), also when one
of its Python stubs dies (Triton 2.51 does not restart a stub; its model would fail every request). While
the server restarts, nothing answers on its ports: clients get connection errors, never an unprotected
answer. Too many restarts in a short time and it gives up with a non-zero exit, for the next supervisor
up (systemd, Kubernetes) to act on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.procfs import stubs
from serving.server import ServerConfig, ServerError, TritonServer


@dataclass
class Supervisor:
    config: ServerConfig
    max_restarts: int = 5  # within ``window_s``; one more and it gives up
    window_s: float = 300.0
    poll_s: float = 0.5
    report: Callable[[str], None] = print
    restarts: list[float] = field(default_factory=list)
    server: TritonServer | None = None

    def _start(self) -> TritonServer:
        self.server = TritonServer(self.config).start()
        return self.server

    def _why_restart(self, server: TritonServer, expected_stubs: int) -> str | None:
        code = server.process.poll()
        if code is not None:
            return f"tritonserver exited with code {code}"
        if self.config.model_control == "none":
            alive = len(stubs(server.process.pid))
            if alive < expected_stubs:
                return f"{expected_stubs - alive} Python-backend stub(s) died"
        return None

    def run(self, stop: threading.Event, ready: Callable[[TritonServer], None] | None = None) -> int:
        """Serve until ``stop`` is set (exit code 0) or restarts run out (exit code 1)."""
        server = self._start()
        if ready:
            ready(server)
        expected = len(stubs(server.process.pid))
        try:
            while not stop.wait(self.poll_s):
                why = self._why_restart(server, expected)
                if why is None:
                    continue
                now = time.monotonic()
                self.restarts = [t for t in self.restarts if now - t < self.window_s] + [now]
                self.report(f"{why}; log: {server.log_path}\n{server.log_tail(15)}")
                server.close()
                if len(self.restarts) > self.max_restarts:
                    self.report(f"giving up: {len(self.restarts)} restarts within {self.window_s:.0f} s")
                    return 1
                self.report(f"restarting tritonserver (restart {len(self.restarts)})")
                try:
                    server = self._start()
                except ServerError as e:
                    self.report(f"restart failed: {e}")
                    return 1
                expected = len(stubs(server.process.pid))
                if ready:
                    ready(server)
            return 0
        finally:
            if self.server is not None:
                self.server.close()
