"""tritonserver's log: bounded on disk, kept after a crash, read from its end.

The server's stdout and stderr go through a pipe to ``RotatingLog``, which writes at most
``max_bytes`` per file and keeps ``backups`` older files (``.1`` the newest): a flood of messages (say,
"Too many open files" thousands of times a second) costs at most ``(backups + 1) * max_bytes`` of disk.
Log files live outside the server's temporary directory, so they survive the server; ``tail`` reads
only the end of the file."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import BinaryIO


class RotatingLog:
    def __init__(self, path: str | Path, max_bytes: int = 16 << 20, backups: int = 2):
        self.path, self.max_bytes, self.backups = Path(path), max_bytes, backups
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._file = self.path.open("ab")
        self._written = self._file.tell()
        self._thread: threading.Thread | None = None

    def write(self, data: bytes) -> None:
        if self._written + len(data) > self.max_bytes and self._written:
            self._rotate()
        data = data[: self.max_bytes]  # one enormous line is cut, not allowed to grow the file past the cap
        self._file.write(data)
        self._file.flush()
        self._written += len(data)

    def _rotate(self) -> None:
        self._file.close()
        for i in range(self.backups, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            newer = self.path.with_name(f"{self.path.name}.{i - 1}") if i > 1 else self.path
            if newer.exists():
                os.replace(newer, older)
        self._file = self.path.open("wb")
        self._written = 0

    def follow(self, stream: BinaryIO) -> RotatingLog:
        """Copy ``stream`` (the server's output pipe) into the log on a thread, until it closes."""

        def run() -> None:
            with stream:
                for line in iter(stream.readline, b""):
                    self.write(line)
            self._file.close()

        self._thread = threading.Thread(target=run, name="fire-server-log", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


def tail(path: str | Path, lines: int = 40, max_bytes: int = 64 << 10) -> str:
    """The last ``lines`` lines, reading at most the last ``max_bytes`` of the file."""
    path = Path(path)
    if not path.is_file():
        return ""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - max_bytes))
        data = f.read()
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def prune(directory: str | Path, keep: int = 40) -> None:
    """Remove all but the ``keep`` newest server logs (with their rotated files) in ``directory``."""
    logs = sorted(Path(directory).glob("tritonserver-*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[:-keep]:
        for p in old.parent.glob(old.name + "*"):
            p.unlink(missing_ok=True)
