"""Reliability and security against a real tritonserver in explicit model-control mode, with the stub
watchdog on: restricted model control, hot reload under load, bad reloads, a killed stub, TLS."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException

from clients import FireClient
from fire_backend.directions import DirectionFile, DirectionFileError
from fire_backend.names import ADMIN_HEADER, GRPC_ADMIN_HEADER
from fire_backend.repair import Repair
from modelio.split import split_at
from serving.admin import ControlError
from serving.admin import load_model as control_load
from serving.control import reload_directions, scrape
from serving.repository import ProtectedModel, build_repository
from serving.server import ServerConfig, TritonServer
from zoo.checkpoint import load_model
from zoo.data import to_tensor_batch

from .conftest import fire_fails, triggered_subset


@pytest.fixture(scope="module")
def default_server(artifacts, tmp_path_factory):
    """The production default: no model control over the network; directions hot-reload from the repository."""
    a = artifacts["cifar10"]
    repo = tmp_path_factory.mktemp("default_repo")
    build_repository([ProtectedModel("cifar10", a.export_dir, a.directions, folded=True, fused=True)], repo)
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        yield server, repo, a


@pytest.fixture(scope="module")
def explicit(artifacts, tmp_path_factory):
    a = artifacts["cifar10"]
    repo = tmp_path_factory.mktemp("explicit_repo")
    build_repository([ProtectedModel("cifar10", a.export_dir, a.directions, plain=True, fused=True)], repo)
    cfg = ServerConfig(
        repo, http_port=0, grpc_port=0, metrics_port=0, model_control="explicit", load_models=["*"], watchdog=True
    )
    with TritonServer(cfg) as server:
        yield server, repo, a


def pipeline(a, x: np.ndarray, directions: DirectionFile | None) -> np.ndarray:
    model, _ = load_model(a.model_dir)
    split = split_at(model, a.info.layer)
    with torch.no_grad():
        feats = split.head(torch.from_numpy(x))
        if directions is not None:
            feats = Repair(directions)(feats)
        return split.tail(feats).numpy()


def batch_of(a) -> np.ndarray:
    return to_tensor_batch(np.concatenate([a.test.images[:4], triggered_subset(a, 4)[0]]))


class Load:
    """Bounded background traffic: ``clients`` threads sending the same batch until stopped (<= 60 s),
    client i to ``models[i % len(models)]``."""

    def __init__(self, url: str, x: np.ndarray, clients: int = 2, models: tuple[str, ...] = ("cifar10",)):
        self.x, self.models, self.stop_flag = x, models, threading.Event()
        self.log: list[list[tuple[float, np.ndarray | None, str | None]]] = [[] for _ in range(clients)]
        self.threads = [threading.Thread(target=self._run, args=(url, i), daemon=True) for i in range(clients)]

    def _run(self, url: str, i: int) -> None:
        c = FireClient(url, "grpc", timeout_s=30)
        deadline = time.time() + 60
        while not self.stop_flag.is_set() and time.time() < deadline:
            t = time.time()
            try:
                self.log[i].append((t, c.infer(self.models[i % len(self.models)], self.x), None))
            except InferenceServerException as e:
                self.log[i].append((t, None, str(e)))
            time.sleep(0.01)

    def wait_for(self, answers: int, timeout: float = 60.0) -> None:
        """Until every client has ``answers`` more answers than now (polling, not sleeping blind)."""
        target = [len(log) + answers for log in self.log]
        deadline = time.monotonic() + timeout
        while any(len(log) < t for log, t in zip(self.log, target, strict=True)):
            if time.monotonic() > deadline:
                raise AssertionError(f"the clients did not get {answers} more answers in {timeout} s")
            time.sleep(0.05)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join()


def test_model_control_needs_the_admin_key_on_both_protocols(explicit):
    server, _, _ = explicit
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/repository/models/cifar10_fire/unload", method="POST", data=b"{}"
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 403 and ADMIN_HEADER in e.value.read().decode()
    import tritonclient.grpc as grpcclient

    g = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        g.unload_model("cifar10_fire")
    with pytest.raises(InferenceServerException, match="restricted"):
        g.get_model_repository_index(headers={GRPC_ADMIN_HEADER: "wrong-key"})
    index = g.get_model_repository_index(headers={GRPC_ADMIN_HEADER: server.admin_key})
    assert len(index.models) == 8  # with the plain twin, the GPU input check, the fused model and its engine
    with urllib.request.urlopen(
        urllib.request.Request(
            f"http://{server.http_url}/v2/repository/index",
            method="POST",
            data=b"{}",
            headers={ADMIN_HEADER: server.admin_key},
        )
    ) as r:
        assert r.status == 200
    assert g.is_model_ready("cifar10")  # the refused calls changed nothing


def test_hot_reload_under_load_switches_once_with_zero_failures(default_server, tmp_path):
    """The repair model picks up a replaced direction file itself: no model control, no failed request.
    So does the folded model (head, repair, tail in one stub) reading the same file."""
    server, repo, a = default_server
    x = batch_of(a)
    old = DirectionFile.load(repo / "cifar10_fire" / "1" / "directions.safetensors")
    new = DirectionFile.load(a.directions).with_mode("subtract", 3.0)  # a visible change in every output (rank 1)
    new_path = new.save(tmp_path / "new.safetensors")
    expected_old, expected_new = pipeline(a, x, old), pipeline(a, x, new)
    assert np.abs(expected_old - expected_new).max() > 0.1
    try:
        with Load(server.grpc_url, x, clients=4, models=("cifar10", "cifar10_folded")) as load:
            load.wait_for(10)  # answers with the old directions
            reload_directions(repo, "cifar10_fire", new_path, server.metrics_url)
            load.wait_for(10)  # and with the new ones
        switched_once(load, expected_old, expected_new)
    finally:
        reload_directions(repo, "cifar10_fire", a.directions, server.metrics_url)


def switched_once(load: Load, expected_old: np.ndarray, expected_new: np.ndarray) -> None:
    """Every client's answers: none failed, each is the old or the new repair's, old then new once."""
    for log in load.log:
        assert [e for _, _, e in log if e] == [], "a request failed during the reload"
        which = []
        for _, logits, _ in log:
            if np.allclose(logits, expected_old, atol=1e-4):
                which.append("old")
            elif np.allclose(logits, expected_new, atol=1e-4):
                which.append("new")
            else:
                pytest.fail("a response matched neither the old nor the new directions")
        switch = which.index("new")
        assert "old" not in which[switch:] and switch > 0, "every response before the switch is old, after new"


def _subtract_3(a, tmp_path) -> tuple[DirectionFile, object]:
    new = DirectionFile.load(a.directions).with_mode("subtract", 3.0)  # a visible change in every output (rank 1)
    return new, new.save(tmp_path / "new.safetensors")


def test_a_fused_model_is_swapped_by_version_under_load(explicit, tmp_path, capsys, monkeypatch):
    """`fire reload` on a fused model (zero hops, the directions graph constants): the new file becomes
    version 2, loaded by Triton beside version 1; no request fails and every answer is the old or the
    new repair's, switching once. A file for another head is refused before anything is written."""
    from fire_cli.main import main

    server, repo, a = explicit
    monkeypatch.setenv("FIRE_ADMIN_KEY", server.admin_key)
    x = batch_of(a)
    new, new_path = _subtract_3(a, tmp_path)
    expected_old, expected_new = pipeline(a, x, DirectionFile.load(a.directions)), pipeline(a, x, new)
    cli = ["reload", "--repo", str(repo), "--model", "cifar10_fused", "--triton-http", server.http_url]
    with Load(server.grpc_url, x, clients=2, models=("cifar10_fused",)) as load:
        load.wait_for(10)
        main([*cli, "--directions", str(new_path)])
        load.wait_for(10)
    assert "cifar10_fused now serves version 2" in capsys.readouterr().out
    switched_once(load, expected_old, expected_new)
    assert sorted(p.name for p in (repo / "cifar10_fused").iterdir() if p.name.isdigit()) == ["2"]
    other = DirectionFile.load(a.directions)
    other.head_sha256 = "0" * 64
    bad = other.save(tmp_path / "other_head.safetensors")
    assert "head" in fire_fails([*cli, "--directions", str(bad)], capsys)
    assert not (repo / "cifar10_fused" / "3").exists()
    np.testing.assert_allclose(FireClient(server.grpc_url).infer("cifar10_fused", x), expected_new, atol=1e-4)


def test_a_fused_swap_the_server_refuses_leaves_the_old_version_serving(default_server, tmp_path):
    """Without model control (the default server), the load is refused: the new version directory is
    removed and version 1 keeps serving."""
    from serving.control import swap_fused

    server, repo, a = default_server
    x = batch_of(a)
    _, new_path = _subtract_3(a, tmp_path)
    with pytest.raises(ControlError, match="version 1 keeps serving"):
        swap_fused(repo, "cifar10_fused", new_path, server.http_url, server.admin_key)
    assert sorted(p.name for p in (repo / "cifar10_fused").iterdir() if p.name.isdigit()) == ["1"]
    expected = pipeline(a, x, DirectionFile.load(a.directions))
    np.testing.assert_allclose(FireClient(server.grpc_url).infer("cifar10_fused", x), expected, atol=1e-4)


def test_reload_verify_and_rollback_accept_the_folded_models_name(default_server, tmp_path, capsys):
    """The folded model serves its repair model's file: the CLI resolves ``<name>_folded`` to it."""
    from fire_cli.main import main

    server, repo, a = default_server
    x = batch_of(a)
    new = DirectionFile.load(a.directions).with_mode("subtract", 2.0)
    new_path = new.save(tmp_path / "new.safetensors")
    main(["verify", str(new_path), str(repo / "cifar10_folded")])
    assert "OK:" in capsys.readouterr().out
    try:
        main(["reload", "--repo", str(repo), "--model", "cifar10_folded", "--directions", str(new_path),
              "--metrics-url", server.metrics_url])  # fmt: skip
        assert "cifar10_fire now serves" in capsys.readouterr().out
        np.testing.assert_allclose(FireClient(server.grpc_url).infer("cifar10_folded", x), pipeline(a, x, new),
                                   atol=1e-4)  # fmt: skip
    finally:
        reload_directions(repo, "cifar10_fire", a.directions, server.metrics_url)


def test_a_bad_new_file_leaves_the_old_directions_serving(default_server, tmp_path):
    server, repo, a = default_server
    x = batch_of(a)
    expected = pipeline(a, x, DirectionFile.load(a.directions))
    deployed = repo / "cifar10_fire" / "1" / "directions.safetensors"
    before = deployed.read_bytes()
    other = DirectionFile.load(a.directions)
    other.head_sha256 = "0" * 64
    with pytest.raises(DirectionFileError, match="re-run `fire calibrate`"):  # refused before touching anything
        reload_directions(repo, "cifar10_fire", other.save(tmp_path / "o.st"), server.metrics_url)
    assert deployed.read_bytes() == before
    failures = lambda: scrape(server.metrics_url).get(("fire_direction_reload_failures_total", "cifar10_fire"), 0)  # noqa: E731
    refused_before = failures()
    try:  # and if a corrupt file lands in the repository anyway, the repair model refuses it, keeps the old one
        deployed.write_bytes(before[:64])
        deadline = time.time() + 15
        while failures() == refused_before and time.time() < deadline:
            time.sleep(0.2)
        assert failures() == refused_before + 1
        np.testing.assert_allclose(FireClient(server.grpc_url).infer("cifar10", x), expected, atol=1e-4)
    finally:
        deployed.write_bytes(before)


CORRUPTIONS = {
    "missing": lambda p, d: p.unlink(),
    "truncated": lambda p, d: p.write_bytes(p.read_bytes()[:100]),
    "bad header": lambda p, d: p.write_bytes((2**40).to_bytes(8, "little") + p.read_bytes()[8:]),
    "wrong feature shape": lambda p, d: _rewrite(
        p, d, beta=np.ones((4, 2, 2), np.float32), mu=np.zeros((4, 2, 2), np.float32), basis=None, readout=None
    ),
    "non-finite values": lambda p, d: _forge(p, d, nan=True),
    "other head": lambda p, d: _rewrite(p, d, head_sha256="0" * 64),
    "unknown format version": lambda p, d: _forge(p, d, version="99"),
}
REASONS = {
    "missing": "not found",
    "truncated": "not a readable",
    "bad header": "not a readable",
    "wrong feature shape": "does not match the deployed layer",
    "non-finite values": "NaN or Inf",
    "other head": "re-run `fire calibrate`",
    "unknown format version": "unknown format version",
}


def _rewrite(path, d: DirectionFile, **changes) -> None:
    for k, v in changes.items():
        setattr(d, k, v)
    d.save(path)


def _forge(path, d: DirectionFile, nan: bool = False, version: str | None = None) -> None:
    """What save() would refuse to write, signed like a real file."""
    from safetensors.numpy import save_file

    from fire_backend.directions import metadata_sha256, tensors_sha256

    t, meta = d.tensors(), d.metadata()
    if nan:
        t["beta"][0, 0, 0] = float("nan")
        meta["tensors_sha256"] = tensors_sha256(t)
    if version:
        meta["format_version"] = version
    meta["metadata_sha256"] = metadata_sha256(meta)
    save_file(t, str(path), metadata=meta)


def test_every_kind_of_bad_direction_file_keeps_the_protected_model_down(artifacts, tmp_path):
    """Explicit mode, nothing loaded: loading the protected model with a bad direction file fails with a
    message naming the file and the reason; the ensemble is not ready and answers with an error."""
    a = artifacts["cifar10"]
    repo = tmp_path / "repo"
    build_repository([ProtectedModel("cifar10", a.export_dir, a.directions)], repo)
    target = repo / "cifar10_fire" / "1" / "directions.safetensors"
    cfg = ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0, model_control="explicit")
    x = to_tensor_batch(a.test.images[:2])
    with TritonServer(cfg) as server:
        c = FireClient(server.grpc_url)
        for kind, corrupt in CORRUPTIONS.items():
            shutil.copyfile(a.directions, target)
            corrupt(target, DirectionFile.load(a.directions))
            with pytest.raises(ControlError) as e:
                control_load(server.http_url, server.admin_key, "cifar10")
            assert str(target) in str(e.value) and REASONS[kind] in str(e.value), (kind, str(e.value))
            assert not c.is_ready("cifar10")
            with pytest.raises(InferenceServerException):
                c.infer("cifar10", x)
        shutil.copyfile(a.directions, target)  # and the good file loads
        control_load(server.http_url, server.admin_key, "cifar10")
        assert c.infer("cifar10", x).shape == (2, 10)


def _stub_pid(server, model: str) -> int:
    from serving.procfs import stubs

    return next(pid for pid, m in stubs(server.process.pid).items() if m == model)


def test_a_killed_repair_stub_fails_closed_and_the_watchdog_restores_it(explicit):
    server, _, a = explicit
    x = batch_of(a)
    protected = pipeline(a, x, DirectionFile.load(a.directions))
    unprotected = pipeline(a, x, None)
    n_before = len(server.watchdog.recoveries)
    with Load(server.grpc_url, x) as load:
        load.wait_for(5)
        killed_at = time.time()
        os.kill(_stub_pid(server, "cifar10_fire"), signal.SIGKILL)
        deadline = time.time() + 45
        while time.time() < deadline and not any(
            t > killed_at and e is None and t > killed_at + 0.5 for log in load.log for t, _, e in log
        ):
            time.sleep(0.2)
        load.wait_for(3)
    answers = [(t, logits, e) for log in load.log for t, logits, e in log]
    for _, logits, _ in answers:
        if logits is not None:
            assert not np.allclose(logits, unprotected, atol=1e-3), "an unprotected answer was served"
            np.testing.assert_allclose(logits, protected, atol=1e-4)
    errors = [e for t, _, e in answers if e]
    assert errors and all("not healthy" in e or "cifar10_fire" in e for e in errors)
    recovered = [t for t, _, e in answers if e is None and t > killed_at + 0.5]
    assert recovered, "the model did not come back"
    r = server.watchdog.recoveries[n_before]
    assert r.model == "cifar10_fire" and r.error is None and r.recovered_at - killed_at < 30


def _bad_http(server, body: bytes, headers: dict | None = None, model: str = "cifar10") -> tuple[int, str]:
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{model}/infer",
        method="POST",
        data=body,
        headers={**server.headers("http"), **(headers or {"Content-Type": "application/json"})},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_malformed_http_requests_get_clear_errors(explicit):
    import json

    server, _, a = explicit
    good = to_tensor_batch(a.test.images[:2])
    header = {
        "inputs": [
            {
                "name": "INPUT",
                "shape": [2, 3, 32, 32],
                "datatype": "FP32",
                "parameters": {"binary_data_size": good.nbytes},
            }
        ]
    }
    head = json.dumps(header).encode()
    cases = {
        "malformed JSON": (b'{"inputs": [ {"name": ', None, "parse|JSON|json|Missing"),
        "truncated binary body": (
            head + good.tobytes()[: good.nbytes // 2],
            {"Inference-Header-Content-Length": str(len(head))},
            "unexpected|size|expected",
        ),
        "oversized payload": (
            head + good.tobytes() + b"\0" * 4096,
            {"Inference-Header-Content-Length": str(len(head))},
            "unexpected|size|expected",
        ),
        "wrong input name": (
            json.dumps(
                {"inputs": [{"name": "PIXELS", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.5] * 3072}]}
            ).encode(),
            None,
            "PIXELS",
        ),
        "missing input": (json.dumps({"inputs": []}).encode(), None, "expected 1 inputs|input"),
    }
    for case, (body, headers, pattern) in cases.items():
        status, text = _bad_http(server, body, headers)
        assert status in (400, 500), (case, status, text)  # Triton answers malformed JSON with 500
        assert __import__("re").search(pattern, text), (case, text)
    status, text = _bad_http(server, json.dumps(header).encode(), model="no_such_model")
    assert status in (400, 404) and "no_such_model" in text
    assert FireClient(server.http_url, "http").infer("cifar10", good).shape == (2, 10)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unknown_model_version_and_empty_batch(explicit, protocol):
    server, _, a = explicit
    c = FireClient(server.grpc_url if protocol == "grpc" else server.http_url, protocol)
    x = to_tensor_batch(a.test.images[:2])
    with pytest.raises(InferenceServerException, match="no_such_model"):
        c._infer_once("no_such_model", x, "INPUT", "LOGITS")
    inp = c.tc.InferInput("INPUT", list(x.shape), "FP32")
    if protocol == "http":
        inp.set_data_from_numpy(x, binary_data=True)
    else:
        inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="version"):
        c.client.infer("cifar10_plain", [inp], model_version="7", headers=c.headers)
    with pytest.raises(InferenceServerException):
        c._infer_once("cifar10", np.zeros((0, 3, 32, 32), np.float32), "INPUT", "LOGITS")
    assert c.infer("cifar10", x).shape == (2, 10)


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_grpc_over_tls_with_a_self_signed_certificate(artifacts, tmp_path):
    a = artifacts["cifar10"]
    repo = tmp_path / "repo"
    build_repository([ProtectedModel("cifar10", a.export_dir, a.directions, plain=True, fused=True)], repo)
    shutil.rmtree(repo / "cifar10")  # the plain twin alone keeps this server small
    cert, key = _self_signed(tmp_path)
    cfg = ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0, tls_cert=cert, tls_key=key)
    x = to_tensor_batch(a.test.images[:2])
    with TritonServer(cfg) as server:
        url = f"localhost:{server.config.grpc_port}"
        assert FireClient(url, "grpc", tls_root_cert=cert).infer("cifar10_plain", x).shape == (2, 10)
        with pytest.raises(InferenceServerException):
            FireClient(url, "grpc", timeout_s=5).infer("cifar10_plain", x)  # plaintext is refused
