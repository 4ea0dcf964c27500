"""The GPU profile: what can be checked on a CPU machine is checked here; the end-to-end run needs a GPU
and a tritonserver with the TensorRT backend, and says so when it skips."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fire_backend.engines import EngineBindingError, check_binding, plan_name, write_record
from fire_backend.files import sha256_file
from serving.server import NGC_TRITONSERVER, ServerConfig, ServerError, TritonServer, pytriton_root, resolve_server

GPU = torch.cuda.is_available()
TENSORRT_SERVER = Path(os.environ.get("FIRE_TRITONSERVER", NGC_TRITONSERVER))


def test_the_gpu_profile_needs_a_server_with_the_tensorrt_backend(tmp_path, monkeypatch):
    monkeypatch.delenv("FIRE_TRITONSERVER", raising=False)
    monkeypatch.delenv("FIRE_BACKEND_DIR", raising=False)
    if not NGC_TRITONSERVER.is_file():  # here: only the nvidia-pytriton wheel's server, Python backend only
        with pytest.raises(ServerError, match="needs a tritonserver with the TensorRT and Python backends"):
            TritonServer(ServerConfig(tmp_path, model_config_name="gpu"))
    wheel = ServerConfig(tmp_path, tritonserver=pytriton_root() / "bin" / "tritonserver", model_config_name="gpu")
    with pytest.raises(ServerError, match=r"has \['python'\]"):
        resolve_server(wheel, tmp_path / "scratch")
    image = tmp_path / "opt" / "tritonserver"  # the layout of the Triton image
    (image / "bin").mkdir(parents=True)
    shutil.copy(pytriton_root() / "bin" / "tritonserver", image / "bin" / "tritonserver")
    for backend in ("tensorrt", "python"):
        (image / "backends" / backend).mkdir(parents=True)
    monkeypatch.setenv("FIRE_TRITONSERVER", str(image / "bin" / "tritonserver"))
    binary, backends, from_wheel = resolve_server(ServerConfig(tmp_path, model_config_name="gpu"), tmp_path / "s")
    assert binary == image / "bin" / "tritonserver" and backends == image / "backends" and not from_wheel
    cpu = resolve_server(ServerConfig(tmp_path), tmp_path / "s2")  # the CPU profile takes the one named too
    assert cpu[0] == binary


def test_a_stale_or_foreign_plan_is_refused(tmp_path):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"the head's onnx")
    plan = tmp_path / plan_name("8.6")
    plan.write_bytes(b"an engine")
    with pytest.raises(EngineBindingError, match="no engine"):
        check_binding(tmp_path, "9.0", sha256_file(onnx_file))  # built for another GPU type only
    write_record(plan, sha256_file(onnx_file), "10.5", "8.6", "test GPU")
    assert check_binding(tmp_path, "8.6", sha256_file(onnx_file)) == plan
    assert json.loads(plan.with_name(plan.name + ".json").read_text())["tensorrt"] == "10.5"
    with pytest.raises(EngineBindingError, match="stale plan"):
        check_binding(tmp_path, "8.6", "0" * 64)  # the directions are bound to another head
    plan.write_bytes(b"an engine, replaced")
    with pytest.raises(EngineBindingError, match="changed after it was built"):
        check_binding(tmp_path, "8.6", sha256_file(onnx_file))


@pytest.mark.skipif(not GPU, reason="no CUDA GPU on this machine: the GPU profile cannot run here")
@pytest.mark.skipif(not TENSORRT_SERVER.is_file(), reason=f"no tritonserver with TensorRT at {TENSORRT_SERVER}")
def test_the_gpu_profile_end_to_end(artifacts, tmp_path):
    """Engines built on this GPU, served with the GPU profile: equal to the CPU pipeline within the GPU
    profile's tolerance (1e-3, FP32 engines without TF32), and the input check refuses bad pixels."""
    from clients import FireClient
    from fire_backend.directions import DirectionFile
    from serving.repository import ProtectedModel, build_engines, build_repository
    from zoo.data import to_tensor_batch

    from .test_reliability import pipeline

    a = artifacts["cifar10"]
    repo = tmp_path / "repo"
    build_repository([ProtectedModel("cifar10", a.export_dir, a.directions, plain=True)], repo)
    assert build_engines(repo)
    x = to_tensor_batch(a.test.images[:16])
    cfg = ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0, model_config_name="gpu")
    with TritonServer(cfg) as server:
        c = FireClient(server.grpc_url)
        np.testing.assert_allclose(c.infer("cifar10", x), pipeline(a, x, DirectionFile.load(a.directions)), atol=1e-3)
        np.testing.assert_allclose(c.infer("cifar10_plain", x), pipeline(a, x, None), atol=1e-3)
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="outside the expected pixel range"):
            c.infer("cifar10", np.full_like(x, 7.0))
