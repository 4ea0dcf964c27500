"""TensorRT engine builds (``modelio.tensorrt``, ``fire build-engines``) on a machine without TensorRT:
what is refused before a build, and what a builder's failure or a concurrent builder leaves behind.
Where a build itself is needed, a builder stands in for TensorRT's (it writes bytes that depend on
the ONNX and on which builder ran); everything around it is the project's real code."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fire_backend.engines import check_binding, plan_name, record_path
from fire_backend.errors import StepFailedError
from serving.configs import ServingSettings, TensorSpec, tensorrt_model, write_config

from .conftest import fire_fails

CC = "9.0"


def _onnx(path: Path, batch: int | str = "N", inputs: int = 1, hw: tuple = (4, 4)) -> Path:
    """A tiny model: y = sum of its inputs (N, 2, H, W) times a weight, ReduceMean to (N, 2)."""
    ins = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [batch, 2, *hw]) for i in range(inputs)]
    w = numpy_helper.from_array(np.full((1, 2, 1, 1), 2.0, np.float32), "w")
    nodes, last = [], "x0"
    for i in range(1, inputs):
        nodes.append(helper.make_node("Add", [last, f"x{i}"], [f"s{i}"]))
        last = f"s{i}"
    nodes.append(helper.make_node("Mul", [last, "w"], ["m"]))
    nodes.append(helper.make_node("ReduceMean", ["m"], ["y"], axes=[2, 3], keepdims=0))
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2])
    model = helper.make_model(
        helper.make_graph(nodes, "g", ins, [out], [w]), opset_imports=[helper.make_opsetid("", 13)]
    )
    onnx.save(model, path)
    return path


def _repo(tmp_path: Path, **onnx_kw) -> Path:
    """A repository with one tensorrt_plan model (GPU profile) served at 2 x 4 x 4, batch up to 8."""
    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    n = onnx_kw.get("inputs", 1)
    _onnx(repo / "m" / "1" / "model.onnx", **onnx_kw)
    ins = [TensorSpec(f"x{i}", (2, 4, 4)) for i in range(n)]
    write_config(
        repo / "m", tensorrt_model("m", ins, [TensorSpec("y", (2,))], ServingSettings(max_batch_size=8)), "gpu"
    )
    return repo


class FakeBuilder:
    """Stands in for TensorRT: writes a plan whose bytes name the ONNX and the build, slowly enough for a
    second builder to overlap; records every profile it was given."""

    def __init__(self, delay: float = 0.2, fail: str | None = None):
        self.delay, self.fail, self.builds, self.lock = delay, fail, [], threading.Lock()

    def __call__(self, onnx_path, plan, profiles, fp16):
        if self.fail:
            raise StepFailedError(f"TensorRT could not parse {onnx_path}: {self.fail}")
        with self.lock:
            self.builds.append(profiles)
            n = len(self.builds)
        plan.write_bytes(b"plan of " + onnx_path.read_bytes()[:64] + b" build %d" % n)
        time.sleep(self.delay)
        plan.write_bytes(plan.read_bytes() + b" done")


@pytest.fixture
def fake_gpu(monkeypatch):
    """This machine as a GPU of compute capability 9.0 with TensorRT 10.5 and the given builder."""
    import modelio.tensorrt as trt

    builder = FakeBuilder()
    monkeypatch.setattr(trt, "_gpu", lambda: (CC, "stand-in GPU"))
    monkeypatch.setattr(trt, "_builder", lambda: ("10.5.0.18", builder))
    return builder


def test_a_fixed_batch_onnx_is_refused_before_anything_is_built(tmp_path, capsys):
    """Real CLI, no GPU here: the check comes first, with the file and the fix."""
    repo = _repo(tmp_path, batch=1)
    err = fire_fails(["build-engines", "--repo", str(repo)], capsys)
    assert "input 'x0' has a fixed batch axis (1) but the config batches up to 8" in err
    assert "dynamic batch axis" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (repo / "m" / "1").iterdir()) == ["model.onnx"]


def test_a_dim_the_config_disagrees_with_is_refused(tmp_path, capsys):
    repo = _repo(tmp_path, hw=(5, 5))
    err = fire_fails(["build-engines", "--repo", str(repo)], capsys)
    assert "input 'x0' has dims [2, 5, 5]" in err and "declares [2, 4, 4]" in err


def test_every_input_gets_a_profile_and_dynamic_hw_is_built_at_the_served_size(tmp_path, fake_gpu):
    from serving.repository import build_engines

    repo = _repo(tmp_path, inputs=2, hw=("H", "W"))
    (plan,) = build_engines(repo)
    (profiles,) = fake_gpu.builds
    assert [(p.name, p.min, p.opt, p.max) for p in profiles] == [
        ("x0", (1, 2, 4, 4), (4, 2, 4, 4), (8, 2, 4, 4)),
        ("x1", (1, 2, 4, 4), (4, 2, 4, 4), (8, 2, 4, 4)),
    ]
    assert plan.name == plan_name(CC)
    assert build_engines(repo) == []  # up to date: nothing rebuilt


def test_a_parser_failure_is_one_line_and_leaves_nothing(tmp_path, fake_gpu, capsys):
    fake_gpu.fail = "In node 3 (importCustom): UNSUPPORTED_NODE: no importer for op FancyOp"
    repo = _repo(tmp_path)
    err = fire_fails(["build-engines", "--repo", str(repo)], capsys)
    assert "could not parse" in err and "FancyOp" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (repo / "m" / "1").iterdir() if not p.name.endswith(".lock")) == ["model.onnx"]


def test_two_concurrent_builds_into_one_directory_leave_a_plan_and_its_own_record(tmp_path, fake_gpu):
    """Two init containers on one volume: the second waits for the first and keeps its plan; the plan on
    disk is always the one its record describes, so the repair model accepts it."""
    from modelio.tensorrt import build_tensorrt_engine

    repo = _repo(tmp_path)
    version = repo / "m" / "1"
    onnx_file = version / "model.onnx"
    results, errors = [], []

    def build():
        try:
            results.append(build_tensorrt_engine(onnx_file, version, 8, {"x0": (2, 4, 4)}))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and len(fake_gpu.builds) == 1  # one build, kept by the second
    from fire_backend.files import sha256_file

    plan = check_binding(version, CC, sha256_file(onnx_file))  # raises on plan B beside record A
    assert plan.read_bytes().endswith(b" done")
    assert json.loads(record_path(plan).read_text())["plan_sha256"] == sha256_file(plan)
    # --rebuild under the same lock: a new plan and its record, still a pair
    build_tensorrt_engine(onnx_file, version, 8, {"x0": (2, 4, 4)}, rebuild=True)
    assert len(fake_gpu.builds) == 2
    check_binding(version, CC, sha256_file(onnx_file))


def test_the_api_builder_parses_from_the_path_so_external_weights_are_found(tmp_path):
    """External-data weights live next to the ONNX: TensorRT finds them only when it parses the file by
    its path. The builder is driven with an object that records the calls TensorRT's API receives."""
    from modelio.tensorrt import InputProfile, _build_with_api

    calls = []

    class Recorder:
        def __getattr__(self, name):
            def call(*args, **kwargs):
                calls.append((name, args))
                return Recorder() if name != "parse_from_file" else True

            return call

        def __bool__(self):
            return True

        def __bytes__(self):
            return b"engine"

    class Trt(Recorder):
        Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
        MemoryPoolType = type("M", (), {"WORKSPACE": 0})
        BuilderFlag = type("F", (), {"TF32": 1, "FP16": 2})

        def Builder(self, logger):  # noqa: N802 - TensorRT's name
            return Recorder()

        def OnnxParser(self, network, logger):  # noqa: N802
            return Recorder()

    onnx_file = tmp_path / "model.onnx"
    _build_with_api(Trt(), onnx_file, tmp_path / "plan", [InputProfile("x0", (1, 2), (4, 2), (8, 2))], False)
    names = [n for n, _ in calls]
    assert ("parse_from_file", (str(onnx_file),)) in calls and "parse" not in names
    assert ("set_shape", ("x0", (1, 2), (4, 2), (8, 2))) in calls and "clear_flag" in names
