"""Gateway under a connection attack: do slow bodies and recycled idle connections stall legitimate
requests?

One tritonserver with the demo's protected model, behind the real HAProxy gateway (``fire gateway``'s
configuration), all on loopback. A legitimate client sends batch-1 HTTP inference requests one after
another from 127.0.0.1 and we record their latency, first with nothing else going on, then while:

- ``slow_bodies`` connections from 127.0.0.2 each announce a body 100 kB longer than they send and
  trickle one byte every ``trickle_s`` (slowloris on the body), reopened as the gateway cuts them;
- ``idle`` connections spread over ``idle_sources`` addresses (127.0.0.3, ...) open and send nothing,
  reopened as the gateway cuts them.

Bounded: ``load_s`` seconds, at most ``slow_bodies + idle`` sockets open at once, loopback only.
Writes ``results/gateway_load.md`` and ``.csv``: requests, failures, p50 and p99 per phase, and the
loaded/unloaded p99 ratio (target: <= 2).

    fire bench gateway
"""

from __future__ import annotations

import csv
import selectors
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration import CalibrationConfig, calibrate
from clients import FireClient
from fire_backend.names import DIRECTIONS_FILE, LOOPBACK, PROJECT_ROOT, address
from modelio.export import export_split
from serving.gateway import GatewayConfig, write_gateway
from serving.repository import ProtectedModel, build_repository
from serving.server import ServerConfig, TritonServer, free_ports
from zoo.data import load_dataset, to_tensor_batch


@dataclass
class GatewayLoadConfig:
    model_dir: Path = PROJECT_ROOT / "models" / "cifar10_resnet_badnets"
    slow_bodies: int = 64
    idle: int = 500
    idle_sources: int = 8  # idle connections spread over this many addresses (more than one client's limit)
    trickle_s: float = 2.0
    load_s: float = 30.0
    requests: int = 400  # legitimate requests per phase (at most; the loaded phase stops at load_s)
    work_dir: Path = PROJECT_ROOT / "build" / "bench-gateway"
    out: Path = PROJECT_ROOT / "results" / "gateway_load.md"

    @classmethod
    def quick(cls) -> GatewayLoadConfig:
        return cls(slow_bodies=8, idle=40, idle_sources=2, load_s=5.0, requests=40,
                   out=PROJECT_ROOT / "results" / "tmp" / "gateway_load.md")  # fmt: skip


class Attack:
    """Slow-body and idle connections against ``host:port``, each reopened when the gateway closes it."""

    def __init__(self, host: str, port: int, cfg: GatewayLoadConfig):
        self.addr, self.cfg = (host, port), cfg
        self.stop = threading.Event()
        self.opened = {"slow": 0, "idle": 0}
        self.refused = 0  # connections the gateway turned away at once (per-source limit)
        self.threads = [threading.Thread(target=self._slow, args=(i,), daemon=True) for i in range(cfg.slow_bodies)]
        self.threads.append(threading.Thread(target=self._idle, daemon=True))

    def _connect(self, source: str) -> socket.socket | None:
        s = socket.socket()
        s.settimeout(2)
        try:
            s.bind((source, 0))
            s.connect(self.addr)
            return s
        except OSError:
            s.close()
            self.refused += 1
            return None

    def _slow(self, i: int) -> None:
        while not self.stop.is_set():
            s = self._connect("127.0.0.2")
            if s is None:
                self.stop.wait(0.5)
                continue
            self.opened["slow"] += 1
            try:
                s.sendall(b"POST /v2/models/cifar10/infer HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100100\r\n\r\n{\"inputs\":")  # fmt: skip
                while not self.stop.wait(self.cfg.trickle_s):
                    s.sendall(b" ")
            except OSError:
                pass  # cut by the gateway: reopen
            finally:
                s.close()

    def _idle(self) -> None:
        sel = selectors.DefaultSelector()
        sources = [f"127.0.0.{3 + k}" for k in range(self.cfg.idle_sources)]
        open_socks: set[socket.socket] = set()
        k = 0
        while not self.stop.is_set():
            while len(open_socks) < self.cfg.idle and not self.stop.is_set():
                s = self._connect(sources[k % len(sources)])
                k += 1
                if s is None:
                    break
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
                open_socks.add(s)
                self.opened["idle"] += 1
            for key, _ in sel.select(timeout=0.5):  # readable: closed (or a 408) by the gateway
                sel.unregister(key.fileobj)
                open_socks.discard(key.fileobj)
                key.fileobj.close()
        for s in open_socks:
            s.close()

    def __enter__(self) -> Attack:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)


def _phase(client: FireClient, x: np.ndarray, n: int, until: float | None = None) -> dict:
    latencies, failures = [], 0
    for _ in range(n):
        if until is not None and time.monotonic() > until:
            break
        t0 = time.perf_counter()
        try:
            client.infer("cifar10", x)
            latencies.append((time.perf_counter() - t0) * 1000)
        except Exception:  # noqa: BLE001 - a failed legitimate request is what we count
            failures += 1
    ms = np.asarray(latencies)
    p50, p99 = (round(float(np.percentile(ms, q)), 2) for q in (50, 99))
    return {"requests": len(latencies) + failures, "failed": failures, "p50_ms": p50, "p99_ms": p99}


def _prepare(cfg: GatewayLoadConfig) -> Path:
    export = cfg.work_dir / "export"
    directions = export / DIRECTIONS_FILE
    if not directions.is_file():
        export_split(cfg.model_dir, "layer2", export, n_check=16)
        calibrate(export, directions, CalibrationConfig(n_poisoned=50, n_clean=300))
    repo = cfg.work_dir / "repo"
    build_repository([ProtectedModel("cifar10", export, directions)], repo)
    return repo


def run_gateway_load(cfg: GatewayLoadConfig | None = None) -> Path:
    cfg = cfg or GatewayLoadConfig()
    repo = _prepare(cfg)
    x = to_tensor_batch(load_dataset("cifar10", "test").images[:1])
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        http_port, grpc_port = free_ports(2)
        gw = GatewayConfig(triton_http=server.http_url, triton_grpc=server.grpc_url,
                           listen_http=address(http_port), listen_grpc=address(grpc_port))  # fmt: skip
        path = write_gateway(repo, cfg.work_dir / "gateway" / "haproxy.cfg", gw)
        proc = subprocess.Popen(["haproxy", "-f", str(path), "-db"], stdout=subprocess.DEVNULL)
        try:
            client = FireClient(gw.listen_http, "http", timeout_s=30)
            deadline = time.monotonic() + 15
            while True:
                try:
                    client.infer("cifar10", x)
                    break
                except Exception:  # noqa: BLE001 - the gateway is still starting
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            _phase(client, x, 20)  # warm-up
            rows = [{"phase": "unloaded", **_phase(client, x, cfg.requests)}]
            with Attack(LOOPBACK, http_port, cfg) as attack:
                time.sleep(min(3.0, cfg.load_s / 3))  # let the attack connections pile up
                loaded = _phase(client, x, 10**9, until=time.monotonic() + cfg.load_s)
                opened, refused = dict(attack.opened), attack.refused
            rows.append({"phase": f"{cfg.slow_bodies} slow bodies + {cfg.idle} idle", **loaded})
        finally:
            proc.terminate()
            proc.wait(10)
    return _write(cfg, rows, opened, refused)


def _write(cfg: GatewayLoadConfig, rows: list[dict], opened: dict, refused: int) -> Path:
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    with cfg.out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ratio = rows[1]["p99_ms"] / rows[0]["p99_ms"]
    lines = [
        "# Gateway under slow-body and idle-connection load",
        "",
        "Written by `fire bench gateway` (benchmarks/gateway_load.py): the demo's protected model behind the "
        "gateway on loopback, a legitimate client sending batch-1 HTTP requests one after another from 127.0.0.1, "
        f"while {cfg.slow_bodies} connections from 127.0.0.2 trickle a body (1 byte / {cfg.trickle_s:g} s, "
        f"100 kB announced) and {cfg.idle} idle connections over {cfg.idle_sources} addresses are reopened as "
        f"the gateway cuts them, for {cfg.load_s:g} s. This machine: 2 cores.",
        "",
        "| phase | requests | failed | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
        *[f"| {r['phase']} | {r['requests']} | {r['failed']} | {r['p50_ms']} | {r['p99_ms']} |" for r in rows],
        "",
        f"Loaded / unloaded p99: **{ratio:.2f}** (target <= 2). Attack connections opened: {opened['slow']} slow-body, "
        f"{opened['idle']} idle; turned away at connect: {refused}.",
        "",
    ]
    cfg.out.write_text("\n".join(lines))
    return cfg.out
