"""Model control against a running server: hot-reload directions, and a watchdog that brings a crashed
Python-backend stub back.

Both use Triton's model-control API, so the server runs with ``--model-control-mode=explicit`` and the
admin key (see ``server.py``). With Triton 2.51 a killed stub is *not* restarted by the server: the model
stays listed READY and every request to it fails with "Stub process ... is not healthy" (an error, never
an unprotected answer) until the model is loaded again; the watchdog does that.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fire_backend.directions import DirectionFile
from fire_backend.export import sha256_file
from fire_backend.repository import parse_config
from fire_backend.server import ADMIN_HEADER

DIRECTIONS = "directions.safetensors"


class ControlError(RuntimeError):
    """A model-control call failed; the message carries the server's reason."""


def load_model(http_url: str, admin_key: str, model: str, timeout: float = 120.0) -> None:
    """(Re)load ``model``; Triton keeps the old version serving until the new one is ready, and keeps it
    when the new one fails to load."""
    req = urllib.request.Request(
        f"http://{http_url}/v2/repository/models/{model}/load",
        method="POST",
        data=b"{}",
        headers={ADMIN_HEADER: admin_key},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout):
            return
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            body = json.loads(body).get("error", body)
        raise ControlError(f"loading {model} failed (HTTP {e.code}): {body}") from None


def deployed_expectations(repository: Path, repair_model: str) -> tuple[tuple[int, ...], str]:
    """Feature shape and head sha256 the repair model will check a direction file against."""
    cfg = parse_config((repository / repair_model / "config.pbtxt").read_text())
    head_onnx = repository / cfg.parameters["HEAD_ONNX"].string_value
    return tuple(cfg.input[0].dims), sha256_file(head_onnx)


def reload_directions(
    http_url: str, admin_key: str, repository: str | Path, repair_model: str, new_directions: str | Path
) -> DirectionFile:
    """Swap in a new direction file and reload the repair model with zero failed requests.

    The file is validated against the deployment first (a bad file never reaches the repository), then
    moved in atomically; if the server still refuses it, the previous file is put back so that a restart
    serves what is serving now."""
    repository = Path(repository)
    shape, head_sha = deployed_expectations(repository, repair_model)
    d = DirectionFile.load(new_directions, feature_shape=shape, head_sha256=head_sha)
    target = repository / repair_model / "1" / DIRECTIONS
    backup = target.with_name(DIRECTIONS + ".previous")
    staged = target.with_name(f".{DIRECTIONS}.incoming")
    shutil.copy2(target, backup)
    shutil.copyfile(new_directions, staged)
    os.replace(staged, target)
    try:
        load_model(http_url, admin_key, repair_model)
    except ControlError:
        os.replace(backup, target)
        raise
    return d


def _stubs(server_pid: int) -> dict[int, str]:
    """Live Python-backend stubs of a server: pid -> model name (from the stub's model path argument)."""
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) != server_pid or stat[0] == "Z":
                continue
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if args and args[0].endswith(b"triton_python_backend_stub") and len(args) > 1:
            out[int(proc.name)] = Path(args[1].decode()).parent.parent.name
    return out


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
    interval_s: float = 0.25
    recoveries: list[Recovery] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fire-stub-watchdog", daemon=True)

    def _run(self) -> None:
        known = _stubs(self.server_pid)
        while not self._stop.wait(self.interval_s):
            current = _stubs(self.server_pid)
            alive_models = set(current.values())
            lost = {m for pid, m in known.items() if pid not in current and m not in alive_models}
            for model in sorted(lost):
                r = Recovery(model, time.time())
                self.recoveries.append(r)
                try:
                    load_model(self.http_url, self.admin_key, model)
                    r.recovered_at = time.time()
                except (ControlError, OSError) as e:
                    r.error = str(e)
            known = _stubs(self.server_pid) if lost else current

    def __enter__(self) -> StubWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
