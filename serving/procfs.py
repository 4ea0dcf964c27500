"""What ``/proc`` says about the server and its Python-backend stubs (Linux): one scan, typed.

Used to find a server's stub processes (the watchdog), to check that a stopped server left nothing
behind, and to measure memory (RSS counts shared library pages in full, PSS splits them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STUB_BINARY = b"triton_python_backend_stub"


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    pgid: int
    argv: tuple[bytes, ...]


def processes() -> list[Process]:
    """Every live (non-zombie) process this user can see."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            argv = tuple((proc / "cmdline").read_bytes().split(b"\0"))
        except (OSError, IndexError):
            continue
        out.append(Process(int(proc.name), int(fields[1]), int(fields[2]), argv))
    return out


def group_pids(pgid: int) -> list[int]:
    """Live processes in process group ``pgid``."""
    return [p.pid for p in processes() if p.pgid == pgid]


def descendants(pid: int, procs: list[Process] | None = None) -> list[int]:
    """``pid`` and every live process below it (``procs``: a scan already made)."""
    children: dict[int, list[int]] = {}
    for p in processes() if procs is None else procs:
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def stubs(server_pid: int) -> dict[int, str]:
    """Live Python-backend stubs below a server: pid -> model name (from the stub's model path argument,
    ``<repository>/<model>/<version>/model.py``)."""
    procs = processes()
    below = set(descendants(server_pid, procs)) - {server_pid}
    return {
        p.pid: Path(p.argv[1].decode(errors="replace")).parent.parent.name
        for p in procs
        if p.pid in below and p.argv and p.argv[0].endswith(STUB_BINARY) and len(p.argv) > 1
    }


def _status_kib(path: str, key: str) -> float:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def rss_mib(pid: int) -> float:
    """Resident set size: counts shared pages (the libraries every stub maps) in full."""
    return _status_kib(f"/proc/{pid}/status", "VmRSS:") / 1024


def pss_mib(pid: int) -> float:
    """Proportional set size: shared pages divided among the processes sharing them (what adds up)."""
    return _status_kib(f"/proc/{pid}/smaps_rollup", "Pss:") / 1024
