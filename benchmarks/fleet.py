"""Loopback fleet: the shape of the Kubernetes Deployment (``deploy/k8s``) on one machine, for tests and
benchmarks. Not a product: in a cluster, Kubernetes runs the pods and ``deploy/rollout_directions.sh``
rolls a direction file out; this harness does the same steps with processes on 127.0.0.1.

- **Pods.** N tritonservers (``serving.server.TritonServer``, as ``fire serve`` starts them), each on
  its own ports, with its own logs and its own copy of the model repository (the manifests' per-pod
  copy: the ``copy-repository`` init container copies the shared volume into the pod), and its own FIRE
  gateway (the pod's sidecar, ``fire gateway``, real HAProxy).
- **The front.** One HAProxy in front of the pods' gateways: round robin, a health check on each
  pod's ``/v2/health/ready`` every 0.5 s, and a failed connection, an empty answer or a 503 retried on
  another pod (what the Service, readiness probes and a retrying ingress do in the cluster).
- **Rollout** (``rollout``): ``deploy/rollout_directions.sh``'s logic. Pod by pod, the new file is
  checked and hot-reloaded into that pod's own repository (``serving.control.reload_directions``,
  confirmed on its metrics); a pod that refuses it stops the rollout and the pods already done put
  their previous file back (``put_back_previous``), so every pod ends on the old file; after the last
  pod, the file is promoted into the shared source repository, which new pods copy.

``fire bench fleet`` measures it: a rollout and a replica killed with SIGKILL, both under load
through the front (failed requests, unprotected answers, the window in which replicas disagree), and
p99 at a fixed offered load with 1, 2, 3 replicas; results in ``results/fleet.md``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fire_backend.errors import FireError
from fire_backend.names import (
    DIRECTIONS_FILE,
    FEATURES,
    HEAD_ONNX,
    INPUT,
    LOOPBACK,
    PROJECT_ROOT,
    TAIL_ONNX,
    ModelNames,
)
from serving.control import put_back_previous, reload_directions
from serving.gateway import GatewayConfig, write_gateway
from serving.repository import restrict
from serving.server import ServerConfig, TritonServer, free_ports


class FleetError(FireError):
    """The fleet could not start, or a rollout stopped (every pod is back on the old file)."""


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 15.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FleetError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise FleetError(f"{what} did not listen on {port} within {timeout:.0f} s")


def front_config(pods: list[tuple[str, str]], http: str, grpc: str) -> str:
    """The front HAProxy: ``pods`` are (HTTP, gRPC) addresses of the pods' gateways."""
    http_servers = "\n".join(f"    server pod{i} {h} check inter 500 fall 2 rise 2" for i, (h, _) in enumerate(pods))
    grpc_servers = "\n".join(
        f"    server pod{i} {g} proto h2 check port {h.rsplit(':', 1)[1]} inter 500 fall 2 rise 2"
        for i, (h, g) in enumerate(pods)
    )
    return f"""# The loopback fleet's front (benchmarks/fleet.py): the Service in front of the pods' gateways.
global
    maxconn 1024
    tune.bufsize 1048576

defaults
    mode http
    option http-buffer-request
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout 503

frontend front_http
    bind {http}
    default_backend pods_http

frontend front_grpc
    bind {grpc} proto h2
    default_backend pods_grpc

backend pods_http
    balance roundrobin
    option httpchk GET /v2/health/ready
{http_servers}

backend pods_grpc
    balance roundrobin
    option httpchk GET /v2/health/ready
{grpc_servers}
"""


@dataclass
class Pod:
    index: int
    repository: Path
    server: TritonServer
    gateway: subprocess.Popen
    http: str  # its gateway's addresses
    grpc: str
    alive: bool = True


@dataclass
class Fleet:
    """``with Fleet(source, n, work_dir) as fleet:`` starts n pods and the front; stops them all."""

    source: Path  # the shared repository (the manifests' volume)
    replicas: int
    work_dir: Path
    pod_sources: dict[int, Path] = field(default_factory=dict)  # a pod that started from another deployment
    pods: list[Pod] = field(default_factory=list)
    front: subprocess.Popen | None = None
    front_http: str = ""
    front_grpc: str = ""

    def __enter__(self) -> Fleet:
        try:
            for i in range(self.replicas):
                self.pods.append(self._start_pod(i))
            self._start_front()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start_pod(self, i: int) -> Pod:
        home = self.work_dir / f"pod{i}"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        repo = home / "models"
        shutil.copytree(self.pod_sources.get(i, self.source), repo, symlinks=True)  # copy-repository init container
        restrict(repo)
        server = TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0, log_dir=home / "logs"))
        server.__enter__()
        http_port, grpc_port = free_ports(2, LOOPBACK)
        http, grpc = f"{LOOPBACK}:{http_port}", f"{LOOPBACK}:{grpc_port}"
        metrics = server.metrics_url.split("://")[-1].split("/")[0]
        cfg = GatewayConfig(triton_http=server.http_url, triton_grpc=server.grpc_url, listen_http=http,
                            listen_grpc=grpc, triton_metrics=metrics)  # fmt: skip
        path = write_gateway(repo, home / "gateway" / "haproxy.cfg", cfg)
        proc = subprocess.Popen(["haproxy", "-f", str(path), "-db"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        _wait_port(http_port, proc, f"pod {i}'s gateway")
        return Pod(i, repo, server, proc, http, grpc)

    def _start_front(self) -> None:
        http_port, grpc_port = free_ports(2, LOOPBACK)
        self.front_http, self.front_grpc = f"{LOOPBACK}:{http_port}", f"{LOOPBACK}:{grpc_port}"
        path = self.work_dir / "front.cfg"
        path.write_text(front_config([(p.http, p.grpc) for p in self.pods], self.front_http, self.front_grpc))
        self.front = subprocess.Popen(["haproxy", "-f", str(path), "-db"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)  # fmt: skip
        _wait_port(grpc_port, self.front, "the front")
        time.sleep(1.5)  # the first health checks pass (rise 2 x 0.5 s)

    def kill(self, i: int) -> None:
        """SIGKILL pod ``i``'s tritonserver (its stubs follow): what a crashed or OOM-killed container is."""
        pod = self.pods[i]
        os.kill(pod.server.process.pid, signal.SIGKILL)
        pod.server.process.wait(30)
        pod.alive = False

    def rollout(self, repair_model: str, new_file: Path) -> list[float]:
        """``deploy/rollout_directions.sh`` on the fleet: returns when each pod served the file (monotonic
        s). A refusal stops it: the pods already done put their previous file back, and FleetError."""
        done, times = [], []
        for pod in (p for p in self.pods if p.alive):
            try:
                reload_directions(pod.repository, repair_model, new_file, pod.server.metrics_url)
            except FireError as e:
                for back in reversed(done):
                    put_back_previous(back.repository, repair_model, back.server.metrics_url)
                raise FleetError(f"pod {pod.index} refused {new_file.name} ({e}); the rollout stopped and "
                                 f"{len(done)} pod(s) put their previous file back") from None  # fmt: skip
            done.append(pod)
            times.append(time.monotonic())
        reload_directions(self.source, repair_model, new_file)  # promoted: new pods start with it
        return times

    def __exit__(self, *exc) -> None:
        if self.front is not None:
            self.front.terminate()
            self.front.wait(10)
        for pod in self.pods:
            pod.gateway.terminate()
            pod.gateway.wait(10)
            pod.server.__exit__(None, None, None)  # a killed one too: its working directory


@dataclass
class Answer:
    sent: float  # monotonic s: when it was due (open loop)
    latency_s: float  # from then to its answer
    logits: np.ndarray | None
    error: str | None


class OfferedLoad:
    """Open-loop traffic to ``model`` at ``url``: ``rate`` requests/s of batch ``x`` for at most
    ``duration_s`` (or until stopped), each sent on schedule by one of ``workers`` threads."""

    def __init__(self, url: str, model: str, x: np.ndarray, rate: float, duration_s: float, workers: int = 8):
        self.url, self.model, self.x, self.rate, self.duration_s = url, model, x, rate, duration_s
        self.answers: list[Answer] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def _run(self) -> None:
        from clients import FireClient

        client = FireClient(self.url, "grpc", timeout_s=30)
        while not self.stop.is_set():
            with self._lock:
                k, self._next = self._next, self._next + 1
            due = self.t0 + k / self.rate
            if due - self.t0 > self.duration_s:
                return
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                logits, error = client.infer(self.model, self.x), None
            except Exception as e:  # noqa: BLE001 - every failure is counted, the message kept
                logits, error = None, str(e).splitlines()[0][:200]
            with self._lock:  # latency from when it was due: a stalled worker's queueing counts
                self.answers.append(Answer(due, time.monotonic() - due, logits, error))

    def __enter__(self) -> OfferedLoad:
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def wait(self) -> None:
        for t in self.threads:
            t.join(self.duration_s + 60)


@dataclass
class Verdicts:
    """Answers sorted by what they match: the old repair, the new one, the unprotected model, or none."""

    total: int
    failed: int
    old: int
    new: int
    unprotected: int
    mixed: int  # matches no whole answer: a batch answered partly by one repair and partly by another
    first_new_s: float | None  # monotonic send times: the window in which replicas disagree
    last_old_s: float | None
    first_errors: list[str]


JUDGE_ATOL = 1e-4  # an answer matches a repair's when every logit is this close


def judge(answers: list[Answer], old: np.ndarray, new: np.ndarray | None, unprotected: np.ndarray,
          atol: float = JUDGE_ATOL) -> Verdicts:  # fmt: skip
    counts = dict.fromkeys(("old", "new", "unprotected", "mixed"), 0)
    first_new = last_old = None
    for a in sorted((a for a in answers if a.error is None), key=lambda a: a.sent):
        if np.allclose(a.logits, old, atol=atol):
            counts["old"] += 1
            last_old = a.sent
        elif new is not None and np.allclose(a.logits, new, atol=atol):
            counts["new"] += 1
            first_new = a.sent if first_new is None else first_new
        elif np.allclose(a.logits, unprotected, atol=atol):
            counts["unprotected"] += 1
        else:
            counts["mixed"] += 1
    errors = [a.error for a in answers if a.error]
    return Verdicts(len(answers), len(errors), first_new_s=first_new, last_old_s=last_old, first_errors=errors[:3],
                    **counts)  # fmt: skip


def p99_ms(answers: list[Answer]) -> float:
    ok = [a.latency_s for a in answers if a.error is None]
    return 1e3 * float(np.percentile(ok, 99)) if ok else float("nan")


# -- the benchmark -----------------------------------------------------------------------------------


@dataclass
class FleetBenchConfig:
    replicas: int = 3  # the rollout and the kill
    scaling: tuple[int, ...] = (1, 2, 3)  # replicas of the p99 table
    rate: float = 40.0  # offered requests/s (batch 8)
    duration_s: float = 15.0
    work_dir: Path = PROJECT_ROOT / "build" / "fleet"
    out: Path = PROJECT_ROOT / "results" / "fleet.md"
    command: str = "fire bench fleet"

    @classmethod
    def quick(cls) -> FleetBenchConfig:
        return cls(replicas=2, scaling=(1, 2), rate=20.0, duration_s=6.0, command="fire bench fleet --quick")


NAME = "cifar10"  # the protected model of the fleet's repository
REPAIR = ModelNames(NAME).repair  # its repair model


def _prepare(cfg: FleetBenchConfig) -> dict:
    """The demo model exported and calibrated, its repository (the shared source), a second deployment
    of it cut elsewhere (a pod not yet updated), two new direction files, and what the protected model
    answers with each file (and unprotected) for one batch of test images."""
    import torch

    from calibration import CalibrationConfig, calibrate
    from fire_backend.directions import DirectionFile
    from fire_backend.onnx_runtime import onnx_session
    from fire_backend.repair import Repair
    from modelio.export import export_split
    from serving.repository import ProtectedModel, build_repository
    from zoo.data import load_dataset, to_tensor_batch

    model_dir = PROJECT_ROOT / "models" / "cifar10_resnet_badnets"
    out = {}
    for key, cut in (("source", "layer2"), ("other", "layer3")):
        export = cfg.work_dir / f"export_{cut}"
        shutil.rmtree(export, ignore_errors=True)
        export_split(model_dir, cut, export)
        calibrate(export, export / DIRECTIONS_FILE, CalibrationConfig())
        repo = cfg.work_dir / key
        shutil.rmtree(repo, ignore_errors=True)
        build_repository([ProtectedModel(NAME, export, export / DIRECTIONS_FILE)], repo)
        out[key] = repo
    export = cfg.work_dir / "export_layer2"
    files = {"v1": DirectionFile.load(export / DIRECTIONS_FILE)}
    for key, mode, alpha in (("v2", "subtract", 2.0), ("v3", "subtract", 0.5)):  # changes seen in every answer
        d = DirectionFile.load(export / DIRECTIONS_FILE).with_mode(mode, alpha)
        d.save(cfg.work_dir / f"{key}.safetensors")
        files[key] = d
    x = to_tensor_batch(load_dataset("cifar10", "test").subset(8, seed=3).images)
    feats = onnx_session(export / HEAD_ONNX).run(None, {INPUT: x})[0]
    tail = onnx_session(export / TAIL_ONNX)
    out["x"] = x
    out["unprotected"] = tail.run(None, {FEATURES: feats})[0]
    for key, d in files.items():
        out[key] = tail.run(None, {FEATURES: Repair(d)(torch.from_numpy(feats.copy())).numpy()})[0]
        out[f"{key}_file"] = cfg.work_dir / f"{key}.safetensors"
    answers = [out[k] for k in ("unprotected", *files)]
    for i, a in enumerate(answers):  # every answer is told apart from every other one
        for b in answers[i + 1 :]:
            if np.abs(a - b).max() < 100 * JUDGE_ATOL:
                raise FleetError("two of the repairs answer alike: the verdicts could not tell them apart")
    return out


def _loaded(fleet: Fleet, p: dict, cfg: FleetBenchConfig, old: str, new: str | None, action):
    """``action`` run a third of the way into an offered load through the front; its verdicts, p99
    and what the action returned."""
    with OfferedLoad(fleet.front_grpc, NAME, p["x"], cfg.rate, cfg.duration_s) as load:
        time.sleep(cfg.duration_s / 3)
        result = action()
        load.wait()
    v = judge(load.answers, p[old], p[new] if new else None, p["unprotected"])
    return v, p99_ms(load.answers), result


@dataclass
class FleetResult:
    rollout: Verdicts
    rollout_spread_ms: float  # first pod switched -> last pod switched
    kill: Verdicts
    refusal: str  # the rollout's message when pod 1 refused
    refused_pods_on_old: list[bool]  # after it, each pod answers as it did before the rollout
    scaling: list[tuple[int, int, int, float, float]]  # replicas, requests, failed, p99 ms, answered/s
    p99: dict[str, float] = field(default_factory=dict)


def run_fleet(cfg: FleetBenchConfig | None = None) -> FleetResult:
    from clients import FireClient

    cfg = cfg or FleetBenchConfig()
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    p = _prepare(cfg)
    with Fleet(p["source"], cfg.replicas, cfg.work_dir / "a") as fleet:
        rollout, p99_rollout, times = _loaded(fleet, p, cfg, "v1", "v2", lambda: fleet.rollout(REPAIR, p["v2_file"]))
        kill, p99_kill, _ = _loaded(fleet, p, cfg, "v2", None, lambda: fleet.kill(1))
    # pod 1 still runs the deployment cut at layer3: the layer2 file is refused there
    with Fleet(p["source"], 2, cfg.work_dir / "b", pod_sources={1: p["other"]}) as fleet:
        ask = [FireClient(pod.server.grpc_url) for pod in fleet.pods]
        before = [c.infer(NAME, p["x"]) for c in ask]
        if not np.allclose(before[0], p["v2"], atol=JUDGE_ATOL):  # the source holds v2 since the first rollout
            raise FleetError("the first rollout's file was not promoted into the source")
        try:
            fleet.rollout(REPAIR, p["v3_file"])
            refusal = ""
        except FleetError as e:
            refusal = str(e)
        on_old = [np.allclose(c.infer(NAME, p["x"]), b, atol=JUDGE_ATOL) for c, b in zip(ask, before, strict=True)]
    scaling = []
    for n in cfg.scaling:
        with (
            Fleet(p["source"], n, cfg.work_dir / f"s{n}") as fleet,
            OfferedLoad(fleet.front_grpc, NAME, p["x"], cfg.rate, cfg.duration_s) as load,
        ):
            load.wait()
        ok = [a for a in load.answers if a.error is None]
        scaling.append(
            (n, len(load.answers), len(load.answers) - len(ok), p99_ms(load.answers), len(ok) / cfg.duration_s)
        )
    return FleetResult(rollout, 1e3 * (times[-1] - times[0]), kill, refusal, on_old, scaling,
                       {"rollout": p99_rollout, "kill": p99_kill})  # fmt: skip


def _verdict_row(what: str, v: Verdicts, p99: float, note: str) -> str:
    return (f"| {what} | {v.total} | {v.failed} | {v.unprotected} | {v.mixed} | {v.old} / {v.new} | {p99:.1f} | "
            f"{note} |")  # fmt: skip


def write_fleet(cfg: FleetBenchConfig, r: FleetResult, wall_s: float) -> Path:
    v = r.rollout
    overlap = 1e3 * (v.last_old_s - v.first_new_s) if v.first_new_s and v.last_old_s else 0.0
    seen = (
        f"old answers up to {overlap:.0f} ms after the first new one"
        if overlap > 0
        else "no old answer after a new one"
    )
    lines = [
        "# Loopback fleet: the Deployment's shape on one machine",
        "",
        f"`benchmarks/fleet.py`: {cfg.replicas} pods (tritonserver with its own copy of the repository, its own "
        "ports and its FIRE gateway), one HAProxy in front (round robin, health checks every 0.5 s, retries on "
        f"another pod). Offered load: {cfg.rate:g} requests/s of 8 CIFAR-10 test images, gRPC, for "
        f"{cfg.duration_s:g} s per scenario; the action a third of the way in. Wall time {wall_s:.0f} s.",
        "",
        "| scenario | requests | failed | unprotected | mixed | old / new answers | p99 ms | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        _verdict_row(
            "rollout, pod by pod",
            r.rollout,
            r.p99["rollout"],
            f"pods switched within {r.rollout_spread_ms:.0f} ms; clients (by send time): {seen}",
        ),  # fmt: skip
        _verdict_row("one pod killed (SIGKILL)", r.kill, r.p99["kill"], "not restarted (the kubelet's job)"),
        "",
        "A file one pod refuses (pod 1 still on a deployment cut at another layer): "
        f"{r.refusal or 'NOT REFUSED'}; afterwards each pod answers as before the rollout: pod 0 "
        f"{'yes' if r.refused_pods_on_old[0] else 'NO'}, pod 1 {'yes' if r.refused_pods_on_old[1] else 'NO'}.",
        "",
        "Zero failed requests through a killed pod rest on the front's retries (a 503 or a lost connection is "
        "retried on another pod); the Kubernetes Service in `deploy/k8s` does not retry, so there the clients "
        "(or an ingress that retries) must. Latency counts from when a request was due (open loop).",
        "",
        f"## p99 at a fixed offered load ({cfg.rate:g} requests/s, batch 8)",
        "",
        "| replicas | requests | failed | p99 ms | answered/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {req} | {fail} | {p99:.1f} | {rate:.1f} |" for n, req, fail, p99, rate in r.scaling]
    lines += [
        "",
        "Every replica here shares the same two cores, so more replicas add processes, not capacity: p99 "
        "shows what the extra hop and the scheduling cost, not the scaling a cluster gets from one pod per node.",
        "",
        f"Command: `{cfg.command}`",
        "",
    ]
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text("\n".join(lines))
    return cfg.out


def main(cfg: FleetBenchConfig | None = None) -> Path:
    cfg = cfg or FleetBenchConfig()
    t0 = time.time()
    return write_fleet(cfg, run_fleet(cfg), time.time() - t0)
