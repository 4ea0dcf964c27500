"""The gpu_torch profile (the halves' TorchScript twins run by torch in the Python backend, the repair in
its torch form) on a real tritonserver. No GPU here: the same configs with CPU instances
(``serving.configs.profile_on_cpu``) run every line of it but CUDA's, the metrics' torch path included."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc.model_config_pb2 as mc

from clients import FireClient
from fire_backend.directions import DirectionFile
from fire_backend.formula import NumpyRepair
from fire_backend.names import (
    GPU_TORCH_PROFILE,
    HALVES_TORCH,
    MODEL_VERSION,
    PARAM_HALVES,
    TORCH_FILE,
    TORCH_STUB_FILE,
    ModelNames,
)
from fire_backend.onnx_runtime import onnx_session
from serving.configs import from_profile, profile_on_cpu, read_config
from serving.repository import ProtectedModel, build_repository
from serving.server import ServerConfig, ServerError, TritonServer
from zoo.data import to_tensor_batch

from .conftest import triggered_subset
from .test_metrics import poll, scrape, value

ON_CPU = "torch_on_cpu"


@pytest.fixture(scope="module")
def torch_repo(artifacts, tmp_path_factory):
    a = artifacts["cifar10"]
    repo = tmp_path_factory.mktemp("gpu_torch") / "repo"
    build_repository([ProtectedModel("c", a.export_dir, a.directions, plain=True, metrics="detailed")], repo)
    return repo


def test_the_gpu_torch_configs_run_torch_halves_on_gpu_instances(torch_repo):
    n = ModelNames("c")
    for half in (n.head, n.tail):
        cfg = read_config(torch_repo / half, GPU_TORCH_PROFILE)
        assert cfg.backend == "python" and cfg.default_model_filename == TORCH_STUB_FILE
        assert [g.kind for g in cfg.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        assert cfg.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
        assert (torch_repo / half / MODEL_VERSION / TORCH_FILE).is_file()
    assert read_config(torch_repo / n.repair, GPU_TORCH_PROFILE).parameters[PARAM_HALVES].string_value == HALVES_TORCH
    assert read_config(torch_repo / n.repair, "gpu").parameters[PARAM_HALVES].string_value == "tensorrt"
    assert from_profile(torch_repo, GPU_TORCH_PROFILE) == [n.guard]  # unused there: the torch head checks pixels


@pytest.mark.integration
def test_torch_halves_and_the_torch_repair_serve_what_the_cpu_profile_computes(torch_repo, artifacts):
    """Logits as the CPU profile computes them; the detailed metrics count, from the torch repair's scores,
    exactly the samples the NumPy form moves (the metrics code once compared a NumPy array with a tensor)."""
    a = artifacts["cifar10"]
    n = ModelNames("c")
    profile_on_cpu(torch_repo, GPU_TORCH_PROFILE, ON_CPU)
    x = to_tensor_batch(np.concatenate([a.test.images[:30], triggered_subset(a, 20)[0]]))
    head = onnx_session(torch_repo / n.head / MODEL_VERSION / "model.onnx")
    tail = onnx_session(torch_repo / n.tail / MODEL_VERSION / "model.onnx")
    repair = NumpyRepair(DirectionFile.load(a.directions))
    features = head.run(None, {head.get_inputs()[0].name: x})[0]
    scores = repair.scores(features)
    repaired, _ = repair.repair_with_scores(features.copy())
    want = tail.run(None, {tail.get_inputs()[0].name: repaired})[0]
    config = ServerConfig(torch_repo, http_port=0, grpc_port=0, metrics_port=0, model_config_name=ON_CPU)
    with TritonServer(config) as server:
        got = FireClient(server.grpc_url, "grpc").infer("c", x)
        np.testing.assert_allclose(got, want, atol=1e-4)

        def flushed():
            m = scrape(server)
            return m if value(m, "fire_repair_samples_total", n.repair) == len(x) else None

        metrics = poll(flushed)
        log = server.log_path.read_text()
    assert value(metrics, "fire_repair_changed_samples_total", n.repair) == repair.changed(scores)
    assert value(metrics, "fire_projection_score_count", n.repair) == len(x)
    assert "first request's features in host memory (is_cpu=True), repaired on cpu, in place: True" in log


@pytest.mark.integration
def test_a_torchscript_half_changed_after_the_build_is_refused(torch_repo, tmp_path):
    """Fail closed: the repair model and the head check the TorchScript file against its record."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(torch_repo, repo)
    profile_on_cpu(repo, GPU_TORCH_PROFILE, ON_CPU)
    torch_file = repo / "c_head" / MODEL_VERSION / TORCH_FILE
    torch_file.write_bytes(torch_file.read_bytes() + b"\0")
    config = ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0, model_config_name=ON_CPU)
    with pytest.raises(ServerError, match="changed after it was recorded"):
        TritonServer(config).start()
