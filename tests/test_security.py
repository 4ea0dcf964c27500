"""Attacks on a running server, each from outside the server process (HTTP, gRPC, raw sockets, /proc,
/dev/shm, and another local user via runuser where the test runs as root), each asserted to fail safely."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from clients import FireClient
from fire_backend.directions import DirectionFile
from fire_backend.names import ADMIN_HEADER, GRPC_ADMIN_HEADER
from serving.gateway import GatewayConfig, write_gateway
from serving.logs import RotatingLog, tail
from serving.procfs import stubs
from serving.repository import ProtectedModel, build_repository
from serving.server import ServerConfig, TritonServer, free_ports
from zoo.data import to_tensor_batch

from .conftest import triggered_subset
from .test_reliability import pipeline

AS_ANOTHER_USER = os.geteuid() == 0 and shutil.which("runuser") is not None
another_user = pytest.mark.skipif(not AS_ANOTHER_USER, reason="needs root and runuser to act as user 'nobody'")


@pytest.fixture(scope="module")
def hardened(artifacts, tmp_path_factory):
    """The production default: protected model and its fused form only, no model control."""
    a = artifacts["cifar10"]
    repo = tmp_path_factory.mktemp("hardened_repo")
    build_repository([ProtectedModel("cifar10", a.export_dir, a.directions, fused=True)], repo)
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        yield server, repo, a


def _post(url: str, body: dict | None = None, headers: dict | None = None) -> int:
    req = urllib.request.Request(url, method="POST", data=json.dumps(body or {}).encode(), headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", "nobody", "--", *cmd], capture_output=True, text=True, timeout=30)


def test_the_admin_key_is_in_no_arguments_and_no_readable_environment(hardened):
    server, _, _ = hardened
    key = server.admin_key.encode()
    pids = [server.process.pid, *stubs(server.process.pid)]
    assert len(pids) == 6  # the server; head, repair, tail, fused, input check
    for pid in pids:
        assert key not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"@FIRE_ADMIN_KEY@" in Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
    for pid in pids[1:]:  # the stubs inherit neither the key nor the preload library
        env = Path(f"/proc/{pid}/environ").read_bytes()
        assert key not in env and b"LD_PRELOAD" not in env
    assert oct(Path(f"/proc/{server.process.pid}/environ").stat().st_mode & 0o777) == "0o400"


@another_user
def test_another_local_user_reads_neither_the_key_nor_tensors_in_flight(hardened):
    server, _, a = hardened
    FireClient(server.grpc_url).infer("cifar10", to_tensor_batch(a.test.images[:4]))
    cmdline = _as_nobody("cat", f"/proc/{server.process.pid}/cmdline")
    assert cmdline.returncode == 0 and server.admin_key not in cmdline.stdout
    assert _as_nobody("cat", f"/proc/{server.process.pid}/environ").returncode != 0
    regions = server.shm_regions()
    assert regions
    for name in regions:
        assert oct((Path("/dev/shm") / name).stat().st_mode & 0o777) == "0o600"
        denied = _as_nobody("head", "-c", "16", f"/dev/shm/{name}")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr


MODEL_PY = base64.b64encode(b"raise SystemExit('attacker code ran')\n").decode()


def test_nobody_without_the_key_loads_code_or_changes_what_a_protected_name_serves(hardened):
    """The model-repository API: load with a config and file override (code execution), unload, index.
    Without the key, or with the placeholder everyone can read: 403. With the key: no model control."""
    server, _, a = hardened
    base = f"http://{server.http_url}/v2/repository"
    attack = {"parameters": {"config": json.dumps({"backend": "python"}), "file:1/model.py": MODEL_PY}}
    for headers in ({}, {ADMIN_HEADER: "@FIRE_ADMIN_KEY@"}, {ADMIN_HEADER: "guess"}):
        assert _post(f"{base}/models/cifar10/load", attack, headers) == 403
        assert _post(f"{base}/models/cifar10/unload", None, headers) == 403
        assert _post(f"{base}/index", None, headers) == 403
    assert _post(f"{base}/models/cifar10/load", attack, {ADMIN_HEADER: server.admin_key}) != 200  # mode none
    g = grpcclient.InferenceServerClient(server.grpc_url)
    for call in (lambda: g.load_model("cifar10"), lambda: g.unload_model("cifar10"), g.get_model_repository_index):
        with pytest.raises(InferenceServerException, match="restricted"):
            call()
    x = to_tensor_batch(np.concatenate([a.test.images[:4], triggered_subset(a, 4)[0]]))
    expected = pipeline(a, x, DirectionFile.load(a.directions))
    np.testing.assert_allclose(FireClient(server.grpc_url).infer("cifar10", x), expected, atol=1e-4)


def test_the_shared_memory_and_statistics_apis_are_closed(hardened, tmp_path):
    server, _, _ = hardened
    region = tmp_path / "region"
    region.write_bytes(b"\0" * 4096)
    h = httpclient.InferenceServerClient(server.http_url)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    for client, name in ((h, "h"), (g, "g")):
        with pytest.raises(InferenceServerException, match="403|restricted|not allowed"):
            client.register_system_shared_memory(f"attack_{name}", "/attack", 4096)
        with pytest.raises(InferenceServerException, match="403|restricted|not allowed"):
            client.get_system_shared_memory_status()
        with pytest.raises(InferenceServerException, match="403|restricted|not allowed"):
            client.unregister_system_shared_memory()
        with pytest.raises(InferenceServerException, match="403|restricted|not allowed"):
            client.get_inference_statistics()
        with pytest.raises(InferenceServerException, match="403|restricted|not allowed"):
            client.update_log_settings({"log_verbose_level": 1})
    assert g.get_inference_statistics(headers={GRPC_ADMIN_HEADER: server.admin_key}).model_stats  # the key works
    assert g.is_server_live()


def test_the_tail_refuses_non_finite_features_like_the_repair(hardened):
    server, _, a = hardened
    shape = [2, *a.info.feature_shape]
    c = FireClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="NaN or Inf"):
        c.infer("cifar10_tail", np.full(shape, np.nan, np.float32), "FEATURES", "LOGITS")
    assert c.infer("cifar10_tail", np.zeros(shape, np.float32), "FEATURES", "LOGITS").shape == (2, 10)


def _raw_grpc_infer(url: str, body: bytes, metadata=()) -> bytes:
    """A hand-made ModelInfer request: whatever bytes the attacker likes."""
    import grpc

    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        return call(body, timeout=10, metadata=metadata)


@pytest.fixture(scope="module")
def gateway(hardened, tmp_path_factory):
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (Debian: apt-get install haproxy); scripts/test.sh installs it")
    server, repo, _ = hardened
    http_port, grpc_port = free_ports(2)
    cfg = GatewayConfig(
        triton_http=server.http_url,
        triton_grpc=server.grpc_url,
        listen_http=f"127.0.0.1:{http_port}",
        listen_grpc=f"127.0.0.1:{grpc_port}",
        maxconn=60,
        backend_maxconn=8,
        client_timeout_s=2,
    )
    path = write_gateway(repo, tmp_path_factory.mktemp("gateway") / "haproxy.cfg", cfg)
    proc = subprocess.Popen(["haproxy", "-f", str(path), "-db"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(cfg.listen_http.split(":"), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield cfg, server
    proc.terminate()
    proc.wait(10)


def test_the_gateway_serves_protected_models_and_nothing_else(gateway, artifacts):
    cfg, server = gateway
    a = artifacts["cifar10"]
    x = to_tensor_batch(a.test.images[:2])
    for proto, url in (("http", cfg.listen_http), ("grpc", cfg.listen_grpc)):
        c = FireClient(url, proto)
        for model in ("cifar10", "cifar10_fused"):
            assert c.infer(model, x).shape == (2, 10)
        assert c.is_ready("cifar10")
        for model, inp, out in (("cifar10_head", "INPUT", "FEATURES"), ("cifar10_fire", "FEATURES", "REPAIRED")):
            with pytest.raises(InferenceServerException, match="403|PERMISSION_DENIED|not a protected model"):
                c.infer(model, x if inp == "INPUT" else np.zeros((2, *a.info.feature_shape), np.float32), inp, out)
        with pytest.raises(InferenceServerException, match="403|PERMISSION_DENIED|not a protected model"):
            c.infer("cifar10_tail", np.zeros((2, *a.info.feature_shape), np.float32), "FEATURES", "LOGITS")
    base = f"http://{cfg.listen_http}/v2"
    for path in ("/repository/index", "/systemsharedmemory/region/x/register", "/logging", "/trace/setting"):
        assert _post(base + path, None, {ADMIN_HEADER: server.admin_key}) == 403  # not even with the key
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(f"{base}/models/cifar10_head/stats", timeout=5)


def test_the_gateway_reads_the_whole_grpc_message(gateway, artifacts):
    """Protobuf lets a field repeat, the last value winning: a request naming the protected model first
    and the unprotected tail last would reach the tail if the gateway read only a prefix."""
    from tritonclient.grpc import service_pb2

    cfg, server = gateway
    a = artifacts["cifar10"]
    feats = np.zeros((1, *a.info.feature_shape), np.float32)
    req = service_pb2.ModelInferRequest(model_name="cifar10")
    req.inputs.add(name="FEATURES", datatype="FP32", shape=list(feats.shape))
    req.raw_input_contents.append(feats.tobytes())
    smuggled = req.SerializeToString() + b"\x0a" + bytes([len("cifar10_tail")]) + b"cifar10_tail"
    import grpc

    key = tuple(server.headers("grpc").items())
    raw = service_pb2.ModelInferResponse.FromString(_raw_grpc_infer(server.grpc_url, smuggled, key))
    assert raw.model_name == "cifar10_tail"  # straight to Triton, the smuggled name wins: the bypass is real
    with pytest.raises(grpc.RpcError) as e:
        _raw_grpc_infer(cfg.listen_grpc, smuggled)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "given twice" in e.value.details()


def test_the_gateway_sheds_idle_connections(gateway, artifacts):
    """300 idle connections (bounded: 300 sockets, ~10 s): the gateway accepts at most maxconn, drops
    idle ones after its client timeout, Triton never sees them, and service resumes."""
    cfg, server = gateway
    host, port = cfg.listen_http.split(":")
    socks = []
    for _ in range(300):
        s = socket.socket()
        s.settimeout(0.2)
        try:
            s.connect((host, int(port)))
        except OSError:
            s.close()
            continue
        socks.append(s)
    triton_fds = len(os.listdir(f"/proc/{server.process.pid}/fd"))
    time.sleep(cfg.client_timeout_s + 3)
    closed = 0  # the gateway answered 408 Request Time-out and hung up, or just hung up
    for s in socks:
        try:
            closed += s.recv(64).startswith((b"HTTP/1.1 408", b""))
        except TimeoutError:
            pass  # still open and silent: not shed
        except OSError:
            closed += 1  # reset
        s.close()
    assert closed >= min(len(socks), cfg.maxconn) - 5
    assert triton_fds < 200  # the flood stopped at the gateway
    x = to_tensor_batch(artifacts["cifar10"].test.images[:2])
    assert FireClient(cfg.listen_http, "http").infer("cifar10", x).shape == (2, 10)


def test_slow_bodies_are_cut_at_the_gateway_and_never_reach_triton(gateway, artifacts):
    """16 connections announcing a body 100 kB longer than they send, one byte a second (bounded: 16
    sockets, ~client timeout + 2 s): each gets 408 when its time is up, Triton never opens a connection
    for them, and a legitimate request meanwhile is answered."""
    cfg, server = gateway
    host, port = cfg.listen_http.split(":")
    triton_fds = len(os.listdir(f"/proc/{server.process.pid}/fd"))
    socks = []
    for _ in range(16):
        s = socket.create_connection((host, int(port)), timeout=cfg.client_timeout_s + 5)
        s.sendall(b"POST /v2/models/cifar10/infer HTTP/1.1\r\nHost: gw\r\nContent-Length: 100100\r\n\r\n{")
        socks.append(s)
    x = to_tensor_batch(artifacts["cifar10"].test.images[:2])
    assert FireClient(cfg.listen_http, "http").infer("cifar10", x).shape == (2, 10)
    assert len(os.listdir(f"/proc/{server.process.pid}/fd")) <= triton_fds + 2  # the legitimate one, not 16
    deadline = time.time() + cfg.client_timeout_s + 2
    answers = []
    for s in socks:
        try:
            while time.time() < deadline:
                s.sendall(b" ")
                time.sleep(0.5)
        except OSError:
            pass
        try:
            answers.append(s.recv(64))
        except OSError:
            answers.append(b"reset")
        s.close()
    assert all(a.startswith(b"HTTP/1.1 408") or a in (b"", b"reset") for a in answers), answers
    assert sum(a.startswith(b"HTTP/1.1 408") for a in answers) >= 8


def test_server_logs_are_capped_and_read_from_the_end(tmp_path):
    log = RotatingLog(tmp_path / "tritonserver-x.log", max_bytes=64 << 10, backups=2)
    line = b"E1125 Too many open files: accept failed\n"
    for _ in range(20_000):  # ~850 KB of flood
        log.write(line)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 3 and sum(f.stat().st_size for f in files) <= 3 * (64 << 10)
    big = tmp_path / "big.log"
    big.write_bytes(b"x" * (50 << 20) + b"\nlast line\n")
    assert tail(big, 1) == "last line"


def _fire_serve(repo: Path, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    ports = [str(p) for p in free_ports(3)]
    cmd = [shutil.which("fire"), "serve", "--repo", str(repo), "--http-port", ports[0], "--grpc-port", ports[1],
           "--metrics-port", ports[2], *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), ports


def _server_pid(port: str) -> int | None:
    from serving.procfs import processes

    return next((p.pid for p in processes() if f"--http-port={port}".encode() in b" ".join(p.argv)), None)


def _wait_serving(url: str, x: np.ndarray, expected: np.ndarray, timeout: float = 90) -> float:
    deadline, t0 = time.time() + timeout, time.time()
    while time.time() < deadline:
        try:
            np.testing.assert_allclose(FireClient(url, timeout_s=5).infer("cifar10", x), expected, atol=1e-4)
            return time.time() - t0
        except (InferenceServerException, ConnectionError, OSError):
            time.sleep(0.5)
    raise AssertionError("the protected model did not come back")


def test_fire_serve_restarts_a_killed_server_and_a_killed_stub(artifacts, tmp_path):
    """SIGKILL the server, then the repair stub, under client traffic: `fire serve` restarts the server each
    time; in between requests fail (never an unprotected answer), then the protected answers return."""
    a = artifacts["cifar10"]
    repo = tmp_path / "repo"
    build_repository([ProtectedModel("cifar10", a.export_dir, a.directions)], repo)
    x = to_tensor_batch(np.concatenate([a.test.images[:4], triggered_subset(a, 4)[0]]))
    protected, unprotected = pipeline(a, x, DirectionFile.load(a.directions)), pipeline(a, x, None)
    proc, ports = _fire_serve(repo)
    url = f"127.0.0.1:{ports[1]}"
    try:
        assert "serving" in proc.stdout.readline()
        _wait_serving(url, x, protected)
        for victim in ("server", "stub"):
            pid = _server_pid(ports[0])
            if victim == "stub":
                pid = next(p for p, m in stubs(pid).items() if m == "cifar10_fire")
            os.kill(pid, signal.SIGKILL)
            seen = []
            deadline = time.time() + 90
            while time.time() < deadline:
                try:
                    seen.append(FireClient(url, timeout_s=5).infer("cifar10", x))
                    if np.allclose(seen[-1], protected, atol=1e-4) and _server_pid(ports[0]) not in (None, pid):
                        break
                except (InferenceServerException, ConnectionError, OSError):
                    time.sleep(0.3)
            assert seen and np.allclose(seen[-1], protected, atol=1e-4), f"not serving again after killing the {victim}"
            assert not any(np.allclose(s, unprotected, atol=1e-4) for s in seen)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_a_stub_that_dies_before_the_supervisor_looks_is_still_seen(artifacts, tmp_path):
    """The supervisor learns which stubs to keep from the server's parsed configs, not only from the stubs it
    sees: one of two repair stubs killed right after the server turned ready (before any count) still
    restarts it. Found short at two starts in a row, a model is held to what runs (no restart loop)."""
    from serving.configs import ServingSettings
    from serving.supervisor import Supervisor

    a = artifacts["cifar10"]
    repo = tmp_path / "repo"
    build_repository([ProtectedModel("cifar10", a.export_dir, a.directions)], repo, ServingSettings(repair_instances=2))
    config = ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)
    with TritonServer(config) as server:
        assert server.python_stub_counts()["cifar10_fire"] == 2
        victim = next(p for p, m in stubs(server.process.pid).items() if m == "cifar10_fire")
        os.kill(victim, signal.SIGKILL)
        deadline = time.time() + 10
        while victim in stubs(server.process.pid) and time.time() < deadline:
            time.sleep(0.1)
        reports = []
        supervisor = Supervisor(config, report=reports.append)
        expected = supervisor.expected_stubs(server)
        assert expected["cifar10_fire"] == 2
        assert "cifar10_fire" in (supervisor._why_restart(server, expected) or "")
        held = supervisor.expected_stubs(server)  # the same shortfall at the next start
        assert held["cifar10_fire"] == 1 and supervisor._why_restart(server, held) is None
        assert any("two starts in a row" in r for r in reports)


def test_fire_serve_refuses_plaintext_on_a_public_address(repository):
    done = subprocess.run([shutil.which("fire"), "serve", "--repo", str(repository), "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0 and "refusing to serve on 0.0.0.0 in plaintext" in done.stderr


# -- second round (gateway parsing: tests/test_gateway.py) ----------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another account")
def test_a_cache_directory_another_account_planted_is_refused(tmp_path, monkeypatch):
    """FIRE_CACHE_DIR made by 'nobody' (with a library to preload into tritonserver), or one others can
    write to, or a library there others can write to: refused before anything is loaded or written."""
    import pwd

    from fire_backend.cache import UnsafePathError
    from serving import server_guard

    nobody = pwd.getpwnam("nobody")
    tmp_path.chmod(0o755)
    planted = tmp_path / "planted"
    (planted / "native").mkdir(parents=True)
    (planted / "native" / "libfire_server_guard-0.so").write_bytes(b"\x7fELF attacker")
    for p in (planted, planted / "native", planted / "native" / "libfire_server_guard-0.so"):
        os.chown(p, nobody.pw_uid, nobody.pw_gid)
    monkeypatch.setenv("FIRE_CACHE_DIR", str(planted))
    with pytest.raises(UnsafePathError, match="owned by uid"):
        server_guard.library()
    with pytest.raises(UnsafePathError, match="owned by uid"):
        TritonServer(ServerConfig(tmp_path, http_port=0))  # logs and keys live there too
    from fire_backend.keys import INFERENCE

    with pytest.raises(UnsafePathError):
        INFERENCE.ensure()  # no key written into the other account's directory
    assert not (planted / "inference_key").exists()

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv("FIRE_CACHE_DIR", str(shared))
    with pytest.raises(UnsafePathError, match="others can write"):
        server_guard.library()

    own = tmp_path / "own"
    monkeypatch.setenv("FIRE_CACHE_DIR", str(own))
    lib = server_guard.library()  # built here, 0700 directory
    assert oct(own.stat().st_mode & 0o777) == "0o700"
    lib.chmod(0o777)
    with pytest.raises(UnsafePathError, match="writable by others"):
        server_guard.library()


def test_the_repository_is_private(hardened):
    """The halves and the direction file are not readable by other accounts."""
    _, repo, _ = hardened
    for p in repo.rglob("*"):
        assert not p.stat().st_mode & 0o007, p


def test_traffic_statistics_survive_a_killed_server(artifacts, tmp_path):
    a = artifacts["cifar10"]
    repo = tmp_path / "repo"
    build_repository([ProtectedModel("cifar10", a.export_dir, a.directions, record_traffic=True)], repo)
    stats_file = repo / "cifar10_tail" / "traffic.safetensors"
    from fire_backend.traffic import TrafficStats

    x = to_tensor_batch(a.test.images[:40])

    def recorded() -> int:
        return TrafficStats.load(stats_file)[0].total if stats_file.is_file() else 0

    server = TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)).start()
    try:
        FireClient(server.grpc_url).infer("cifar10", x)
        deadline = time.time() + 30
        while recorded() < 40 and time.time() < deadline:
            time.sleep(0.3)
        assert recorded() == 40
        os.kill(server.process.pid, signal.SIGKILL)  # no finalize, no last flush
        server.process.wait()
    finally:
        server.close()
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        FireClient(server.grpc_url).infer("cifar10", x[:10])
        deadline = time.time() + 30
        while recorded() < 50 and time.time() < deadline:
            time.sleep(0.3)
        assert recorded() == 50  # the restarted tail went on from the 40


def test_the_supervisor_backs_off_instead_of_giving_up():
    from serving.supervisor import Supervisor

    s = Supervisor(ServerConfig(Path(".")), backoff_s=1.0, max_backoff_s=8.0, window_s=300)
    delays = []
    for _ in range(8):
        s._note_restart()
        delays.append(s.delay())
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    s.restarts = [time.monotonic() - 301] * 7  # served for a window: back to an immediate restart
    s._note_restart()
    assert s.delay() == 0.0


def test_per_sample_scores_are_not_on_the_metrics_port_by_default(hardened):
    """The score histogram and the repaired-sample counter would tell any local prober how its trigger
    variant fares: they exist only with metrics='detailed'."""
    server, _, a = hardened
    FireClient(server.grpc_url).infer("cifar10", to_tensor_batch(a.test.images[:8]))
    deadline = time.time() + 20
    while time.time() < deadline:
        text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
        if 'fire_repair_samples_total{model="cifar10_fire"}' in text:
            break
        time.sleep(0.3)
    assert 'fire_repair_samples_total{model="cifar10_fire"}' in text  # the counts are there
    assert "fire_projection_score" not in text and "fire_repair_changed_samples_total" not in text


def test_a_users_model_code_runs_only_from_files_no_other_account_can_change(tmp_path, monkeypatch):
    """``fire protect --torch package.module:factory`` (and a TorchScript file) runs the user's code: a
    module, a package ``__init__`` on the way to it, a module it imports, or a TorchScript file that
    another account owns or can write to, or that sits in a directory others can write to (sticky or
    not: there they could drop a module Python prefers), is refused before it runs."""
    import pwd
    import sys

    import torch

    from fire_backend.cache import UnsafePathError
    from modelio.sources import load_torch_model

    tmp_path.chmod(0o755)
    ran = tmp_path / "ran"
    pkg = tmp_path / "pkg_fire_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"open({str(ran)!r}, 'a').write('init ')\n")
    (pkg / "net.py").write_text(
        f"open({str(ran)!r}, 'a').write('net ')\nimport torch\n\ndef make():\n    return torch.nn.Linear(2, 2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    def fresh():
        for name in ("pkg_fire_test", "pkg_fire_test.net"):
            sys.modules.pop(name, None)

    (pkg / "helper.py").write_text(f"open({str(ran)!r}, 'a').write('helper ')\n")
    (pkg / "net.py").write_text(
        (pkg / "net.py").read_text().replace("import torch", "import torch\nfrom . import helper")
    )
    for path, mode, match in ((pkg / "net.py", 0o666, "writable by others"), (pkg / "__init__.py", 0o664, "writable"),
                              (pkg, 0o777, "writable by others"), (pkg, 0o1777, "writable by others"),
                              (pkg / "helper.py", 0o646, "writable by others")):  # fmt: skip
        old = path.stat().st_mode & 0o777
        path.chmod(mode)
        fresh()
        with pytest.raises(UnsafePathError, match=match):
            load_torch_model("pkg_fire_test.net:make")
        path.chmod(old)
        assert not ran.exists() or "helper" not in ran.read_text()  # refused before the helper ran
    nobody = pwd.getpwnam("nobody")
    os.chown(pkg / "net.py", nobody.pw_uid, nobody.pw_gid)
    fresh()
    with pytest.raises(UnsafePathError, match="owned by uid"):
        load_torch_model("pkg_fire_test.net:make")
    os.chown(pkg / "net.py", os.geteuid(), os.getegid())
    fresh()
    ran.unlink(missing_ok=True)
    assert isinstance(load_torch_model("pkg_fire_test.net:make"), torch.nn.Linear)
    assert ran.read_text().split() == ["init", "net", "helper"]

    scripted = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    scripted.chmod(0o646)
    with pytest.raises(UnsafePathError, match="writable by others"):
        load_torch_model(str(scripted))
    scripted.chmod(0o644)
    assert load_torch_model(str(scripted)) is not None
