"""Integration: a real tritonserver serving the CIFAR-10 and GTSRB models, protected and plain."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException

from clients import FireClient
from fire_backend.directions import DirectionFile
from fire_backend.repair import Repair
from modelio.split import split_at
from serving.server import ServerConfig, TritonServer
from zoo.checkpoint import load_model
from zoo.data import to_tensor_batch

from .conftest import triggered_subset

PROTOCOLS = ["grpc", "http"]


def client(server, protocol) -> FireClient:
    return FireClient(server.grpc_url if protocol == "grpc" else server.http_url, protocol)


def local_logits(a, x: np.ndarray, protected: bool, mode: str | None = None) -> np.ndarray:
    model, _ = load_model(a.model_dir)
    split = split_at(model, a.info.layer)
    with torch.no_grad():
        feats = split.head(torch.from_numpy(x))
        if protected:
            feats = Repair(DirectionFile.load(a.directions), mode)(feats)
        return split.tail(feats).numpy()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_served_logits_equal_the_local_torch_pipeline(server, artifacts, protocol):
    c = client(server, protocol)
    for a in artifacts.values():
        x = to_tensor_batch(np.concatenate([a.test.images[:20], triggered_subset(a, 20)[0]]))
        for model, protected in ((a.name, True), (f"{a.name}_plain", False)):
            np.testing.assert_allclose(c.infer(model, x), local_logits(a, x, protected), atol=1e-4)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_fused_whole_and_mode_variants_equal_their_local_pipelines(server, artifacts, protocol):
    a = artifacts["cifar10"]
    c = client(server, protocol)
    x = to_tensor_batch(np.concatenate([a.test.images[:10], triggered_subset(a, 10)[0]]))
    model, _ = load_model(a.model_dir)
    with torch.no_grad():
        np.testing.assert_allclose(c.infer("cifar10_whole", x), model(torch.from_numpy(x)).numpy(), atol=1e-4)
    np.testing.assert_allclose(c.infer("cifar10_fused", x), local_logits(a, x, True), atol=1e-4)
    for mode in ("subtract", "gated"):
        np.testing.assert_allclose(c.infer(f"cifar10_{mode}", x), local_logits(a, x, True, mode), atol=1e-4)


@pytest.mark.parametrize("name", ["cifar10", "gtsrb"])
def test_two_protected_models_lower_asr_on_one_server(server, artifacts, name):
    a = artifacts[name]
    c = client(server, "grpc")
    triggered, labels = triggered_subset(a)
    plain = c.classify(f"{name}_plain", triggered)
    fire = c.classify(name, triggered)
    asr_plain, asr_fire = (plain == a.attack.target).mean(), (fire == a.attack.target).mean()
    assert asr_plain > 0.8 and asr_fire < 0.15, (asr_plain, asr_fire)
    assert (fire == labels).mean() > (plain == labels).mean() + 0.4


BAD_INPUTS = {
    "wrong dtype": (np.zeros((2, 3, 32, 32), np.float64), "FP64|data-type|datatype"),
    "wrong spatial size": (np.zeros((2, 3, 16, 16), np.float32), "unexpected shape|shape"),
    "wrong channels": (np.zeros((2, 1, 32, 32), np.float32), "unexpected shape|shape"),
    "wrong rank": (np.zeros((2, 3, 32), np.float32), "unexpected shape|shape"),
    "NaN pixels": (np.full((2, 3, 32, 32), np.nan, np.float32), "NaN or Inf"),
    "Inf pixels": (
        np.where(np.eye(32, dtype=bool), np.inf, 0.5).astype(np.float32)[None, None].repeat(3, 1),
        "NaN or Inf",
    ),
    "out of range": (np.full((2, 3, 32, 32), 300.0, np.float32), "outside the expected pixel range"),
    "oversize batch": (np.zeros((65, 3, 32, 32), np.float32), "batch-size must be <= 64"),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(server, artifacts, protocol, case):
    x, pattern = BAD_INPUTS[case]
    c = client(server, protocol)
    with pytest.raises(InferenceServerException, match=pattern):
        c._infer_once("cifar10", x, "INPUT", "LOGITS")
    good = to_tensor_batch(artifacts["cifar10"].test.images[:4])
    assert c.infer("cifar10", good).shape == (4, 10)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_input_name_is_named_in_the_error(server, artifacts, protocol):
    c = client(server, protocol)
    x = to_tensor_batch(artifacts["cifar10"].test.images[:2])
    with pytest.raises(InferenceServerException, match="PIXELS"):
        c._infer_once("cifar10", x, "PIXELS", "LOGITS")
    assert c.infer("cifar10", x).shape == (2, 10)


def test_fire_eval_cli_measures_through_the_server(server, repository):
    """`fire eval` measures the attack the direction file records (and says so), without --attack."""
    fire = shutil.which("fire") or f"{sys.executable} -m fire_cli.main"
    out = subprocess.run(
        [*fire.split(), "eval", "--url", server.grpc_url, "--repo", str(repository), "--models", "cifar10",
         "cifar10_plain", "--limit", "100"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout  # fmt: skip
    assert "attack: badnets (recorded in cifar10's direction file); dataset: cifar10" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| cifar10")}
    asr = {m: float(rows[m].split("|")[3]) for m in ("cifar10", "cifar10_plain")}
    assert asr["cifar10"] < asr["cifar10_plain"] - 50
    refused = subprocess.run([*fire.split(), "eval", "--url", server.grpc_url, "--repo", "/nonexistent", "--models",
                              "cifar10", "--attack-param", "target=1"], capture_output=True, text=True)  # fmt: skip
    assert refused.returncode != 0 and "--attack-param needs an attack" in refused.stderr


def test_bad_directions_fail_closed_and_stop_cleanly(artifacts, tmp_path):
    """A corrupt direction file: the repair model and the protected ensemble are not served, the plain
    twin still is; stopping the server leaves no stub process and no shared-memory region."""
    from serving.repository import ProtectedModel, build_repository

    a = artifacts["cifar10"]
    repo = tmp_path / "repo"
    build_repository([ProtectedModel("cifar10", a.export_dir, a.directions, plain=True)], repo)
    target = repo / "cifar10_fire" / "1" / "directions.safetensors"
    target.write_bytes(target.read_bytes()[:100])  # truncated after the build-time check
    server = TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0))
    server.start(require_all_models=False)
    try:
        states = server.model_states()
        assert states["cifar10_fire"]["state"] == "UNAVAILABLE"
        assert "directions.safetensors" in states["cifar10_fire"]["reason"]
        assert states["cifar10"].get("state") != "READY", "the protected ensemble must not be served"
        assert states["cifar10_plain"]["state"] == "READY"
        c = client(server, "grpc")
        x = to_tensor_batch(a.test.images[:4])
        assert not c.is_ready("cifar10")
        with pytest.raises(InferenceServerException, match="cifar10"):
            c.infer("cifar10", x)
        assert c.infer("cifar10_plain", x).shape == (4, 10)
        assert server.shm_regions(), "the running server has shared-memory regions of its own"
    finally:
        server.stop()
    assert server.leftover_processes == [] and server.leftover_shm == []


def test_classify_image_files_matches_arrays(server, artifacts, tmp_path):
    from PIL import Image

    from clients import load_images

    a = artifacts["cifar10"]
    paths = []
    for i, img in enumerate(a.test.images[:6]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    c = client(server, "http")
    np.testing.assert_array_equal(c.classify("cifar10", load_images(paths)), c.classify("cifar10", a.test.images[:6]))
    fire = shutil.which("fire")
    out = subprocess.run(
        [
            fire,
            "classify",
            "--url",
            server.grpc_url,
            "--repo",
            str(server.config.repository),
            "--model",
            "cifar10",
            *map(str, paths),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    printed = [int(line.split("\t")[1].split()[0]) for line in out.splitlines()]
    assert printed == list(c.classify("cifar10", a.test.images[:6]))
    assert "(" in out  # the label file's names beside the labels


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process."""
    from pathlib import Path

    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if stat[0] != "Z":
                out[int(proc.name)] = (int(stat[1]), (proc / "cmdline").read_bytes().decode(errors="replace"))
        except (OSError, IndexError):
            continue
    return out


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_fire_serve_binds_loopback_and_leaves_nothing_behind(repository, sig):
    """SIGTERM: `fire serve` stops its server. SIGKILL (it cannot clean up): the server, told by the
    kernel that its launcher died, stops itself, and its stubs follow."""
    import signal
    import time

    from serving.server import free_ports

    ports = [str(p) for p in free_ports(3)]
    proc = subprocess.Popen(
        [
            shutil.which("fire"),
            "serve",
            "--repo",
            str(repository),
            "--http-port",
            ports[0],
            "--grpc-port",
            ports[1],
            "--metrics-port",
            ports[2],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert f"HTTP 127.0.0.1:{ports[0]}" in line and f"gRPC 127.0.0.1:{ports[1]}" in line, line
        assert FireClient(f"127.0.0.1:{ports[1]}").is_ready("gtsrb")
        procs = _processes()
        server_pids = [p for p, (_, cmd) in procs.items() if f"--http-port={ports[0]}" in cmd]
        assert len(server_pids) == 1
        stubs = [p for p, (ppid, _) in procs.items() if ppid == server_pids[0]]
        assert len(stubs) == 12, "one stub per Python-backend model (2 x head, fire, tail, guard; 4 cifar10 extras)"
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=60)
    finally:
        proc.kill()
    deadline = time.monotonic() + 60
    while set(_processes()) & {*server_pids, *stubs}:
        assert time.monotonic() < deadline, f"tritonserver or a stub outlived `fire serve` ({sig})"
        time.sleep(0.2)


@pytest.mark.integration  # goes through TritonServer.start (refused before the process starts)
def test_a_server_whose_stubs_would_import_numpy_2_refuses_to_start(tmp_path, monkeypatch, capsys):
    """The 2.51 stubs misread tensors with numpy 2. The check runs the interpreter the stubs would run,
    with their PYTHONPATH: here a numpy 2 found first on it (a package that says it is 2.2.0)."""
    from serving.server import ServerError, check_stub_numpy

    fake = tmp_path / "site" / "numpy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "2.2.0"\n')
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    with pytest.raises(ServerError, match=r"need numpy < 2; .* imports numpy 2\.2\.0"):
        TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)).start()
    monkeypatch.delenv("PYTHONPATH")
    env = TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)).environment()
    assert check_stub_numpy(env).startswith("1.")  # the project's environment passes
