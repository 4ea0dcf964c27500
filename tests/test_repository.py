import pytest
from tritonclient.grpc import model_config_pb2

from fire_backend.directions import DirectionFileError
from serving.configs import parse_config
from serving.repository import ProtectedModel, build_repository

KIND_CPU, KIND_GPU = model_config_pb2.ModelInstanceGroup.KIND_CPU, model_config_pb2.ModelInstanceGroup.KIND_GPU


def _configs(repo, profile):
    """Every model's config as Triton would pick it with --model-config-name=<profile>."""
    out = {}
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir()):
        custom = model_dir / "configs" / f"{profile}.pbtxt"
        path = custom if profile != "cpu" and custom.exists() else model_dir / "config.pbtxt"
        out[model_dir.name] = parse_config(path.read_text())
    return out


def test_every_config_parses_with_tritons_schema_for_both_profiles(repository, artifacts):
    for profile in ("cpu", "gpu"):
        configs = _configs(repository, profile)
        for name in artifacts:
            expected = {name, f"{name}_plain", f"{name}_head", f"{name}_fire", f"{name}_tail"}
            assert expected <= set(configs)
        extras = {"cifar10_whole", "cifar10_fused", "cifar10_subtract", "cifar10_fire_subtract", "cifar10_gated"}
        assert extras <= set(configs)
        for name, cfg in configs.items():
            assert cfg.name == name
            if cfg.platform == "ensemble":
                steps = [s.model_name for s in cfg.ensemble_scheduling.step]
                assert all(cfg.max_batch_size <= configs[s].max_batch_size for s in steps)
            else:
                assert cfg.HasField("dynamic_batching")


def test_the_tensor_a_repair_edits_in_place_has_no_other_reader(repository):
    """The repair writes into its input (on GPU, the head's own output buffer): in every ensemble of both
    profiles, every tensor is read by one step at most, so no other step sees the edit or the original."""
    for profile in ("cpu", "gpu"):
        for name, cfg in _configs(repository, profile).items():
            if cfg.platform == "ensemble":
                read = [t for step in cfg.ensemble_scheduling.step for t in step.input_map.values()]
                assert len(read) == len(set(read)), (profile, name, read)


def test_profiles_place_the_halves_and_the_repair(repository):
    cpu, gpu = _configs(repository, "cpu"), _configs(repository, "gpu")
    assert cpu["cifar10_head"].backend == "python" and cpu["cifar10_head"].instance_group[0].kind == KIND_CPU
    assert gpu["cifar10_head"].platform == "tensorrt_plan" and gpu["cifar10_head"].instance_group[0].kind == KIND_GPU
    assert gpu["cifar10_tail"].default_model_filename == "model.plan"
    fire = gpu["cifar10_fire"]
    assert fire.backend == "python" and fire.instance_group[0].kind == KIND_GPU
    assert fire.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in cpu["cifar10_fire"].parameters
    assert [s.model_name for s in cpu["cifar10"].ensemble_scheduling.step] == [
        "cifar10_head",
        "cifar10_fire",
        "cifar10_tail",
    ]
    assert [s.model_name for s in cpu["cifar10_plain"].ensemble_scheduling.step] == ["cifar10_head", "cifar10_tail"]
    for half in ("head", "tail"):
        assert (repository / f"cifar10_{half}" / "1" / "model.onnx").is_file()
    assert gpu["cifar10_tail"].cc_model_filenames["8.6"] == "model.sm86.trt10.5.plan"  # one engine per GPU type
    # GPU: a TensorRT head cannot refuse bad pixels: every model taking pixels starts with the input check
    assert [s.model_name for s in gpu["cifar10"].ensemble_scheduling.step] == [
        "cifar10_guard", "cifar10_head", "cifar10_fire", "cifar10_tail"
    ]  # fmt: skip
    assert gpu["cifar10_guard"].instance_group[0].kind == KIND_GPU and gpu["cifar10_guard"].backend == "python"
    assert [s.model_name for s in gpu["cifar10_fused"].ensemble_scheduling.step] == [
        "cifar10_guard", "cifar10_fused_engine"
    ]  # fmt: skip
    assert gpu["cifar10_fused_engine"].platform == "tensorrt_plan" and cpu["cifar10_fused"].backend == "python"
    assert [s.model_name for s in cpu["cifar10_fused_engine"].ensemble_scheduling.step] == ["cifar10_fused"]
    assert cpu["cifar10_fused"].parameters["INPUT_RANGE"].string_value  # the CPU stub checks pixels itself
    assert cpu["cifar10_fire_gated"].parameters["MODE"].string_value == "gated"
    assert [s.model_name for s in cpu["cifar10_gated"].ensemble_scheduling.step] == [
        "cifar10_head",
        "cifar10_fire_gated",
        "cifar10_tail",
    ]
    shim = (repository / "cifar10_fire" / "1" / "model.py").read_text()
    assert "from fire_backend.triton.repair_model import TritonPythonModel" in shim and len(shim.splitlines()) <= 4


def test_builder_refuses_directions_of_another_model(artifacts, tmp_path):
    a, other = artifacts["cifar10"], artifacts["gtsrb"]
    with pytest.raises(DirectionFileError, match="re-run `fire calibrate`"):
        build_repository([ProtectedModel("x", a.export_dir, other.directions)], tmp_path)
    with pytest.raises(ValueError, match="unique"):
        build_repository([ProtectedModel("x", a.export_dir, a.directions)] * 2, tmp_path)


def test_a_broken_config_is_caught_by_the_schema():
    with pytest.raises(Exception, match="no_such_field"):
        parse_config('name: "x" no_such_field: 1')


def test_configs_are_messages_and_byte_stable(artifacts, tmp_path):
    """Every config is printed from a ModelConfig message: two builds give the same bytes, and a tensor
    the schema cannot express is refused before anything is written."""
    from serving.configs import TensorSpec

    a = artifacts["cifar10"]
    for out in ("one", "two"):
        build_repository([ProtectedModel("x", a.export_dir, a.directions)], tmp_path / out)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.pbtxt"))
    # head, fire, tail, guard and the ensemble: config.pbtxt + configs/gpu.pbtxt each, and configs/gpu_torch.pbtxt
    # for the three whose gpu_torch form differs (TorchScript halves, a repair told it edits torch's output)
    assert len(files) == 13
    torch_profile = {f.parent.parent.name for f in files if f.name == "gpu_torch.pbtxt"}
    assert torch_profile == {"x_head", "x_fire", "x_tail"}
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()
    text = (tmp_path / "one" / "x_head" / "config.pbtxt").read_text()
    assert 'name: "INPUT"' in text and "format: FORMAT_NCHW" in text and "dims: 32" in text
    with pytest.raises(ValueError, match="unsupported dtype"):
        TensorSpec("x", (3,), "complex64")


def test_instances_are_set_per_step(artifacts, tmp_path):
    """--instances sets every step's instance_group count; --repair-instances the repair step's own."""
    from serving.configs import ServingSettings, read_config

    a = artifacts["cifar10"]
    settings = ServingSettings(instances=2, repair_instances=1)
    build_repository([ProtectedModel("x", a.export_dir, a.directions, folded=True)], tmp_path, settings)
    counts = {m: read_config(tmp_path / m).instance_group[0].count for m in ("x_head", "x_fire", "x_tail", "x_folded")}
    assert counts == {"x_head": 2, "x_fire": 1, "x_tail": 2, "x_folded": 2}
    gpu = read_config(tmp_path / "x_fire", "gpu").instance_group[0]
    assert gpu.count == 1 and gpu.kind == gpu.KIND_GPU


def test_a_fused_swap_refuses_a_head_that_is_not_the_one_its_export_names(artifacts, tmp_path):
    """swap_fused builds the new version from the fused model's kept export: a head.onnx there that is
    not the one split.json names is refused before anything is built or loaded."""
    from serving.admin import ControlError
    from serving.control import swap_fused

    a = artifacts["cifar10"]
    build_repository([ProtectedModel("x", a.export_dir, a.directions, fused=True)], tmp_path)
    head = tmp_path / "x_fused" / "fused_sources" / "head.onnx"
    head.write_bytes(head.read_bytes() + b"\0")
    with pytest.raises(ControlError, match="not the head"):
        swap_fused(tmp_path, "x_fused", a.directions, "127.0.0.1:9", "no-key")
    assert sorted(p.name for p in (tmp_path / "x_fused").iterdir() if p.name.isdigit()) == ["1"]


def test_reloading_the_file_in_place_keeps_the_previous_one_for_the_undo(repository, tmp_path):
    """A rollout gives the file again to a pod that may serve it already: that reload changes nothing,
    so `fire reload --previous` still puts back the file from before the rollout."""
    import shutil

    from fire_backend.directions import DirectionFile
    from serving.control import put_back_previous, reload_directions

    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    live = repo / "cifar10_fire" / "1" / "directions.safetensors"
    old = live.read_bytes()
    new = DirectionFile.load(live)
    new.alpha = 0.5
    new_path = new.save(tmp_path / "new.safetensors")
    reload_directions(repo, "cifar10_fire", new_path)
    reload_directions(repo, "cifar10_fire", new_path)  # in place already: a no-op
    assert live.read_bytes() == new_path.read_bytes()
    put_back_previous(repo, "cifar10_fire")
    assert live.read_bytes() == old


def test_a_build_that_fails_leaves_the_repository_as_it_was(artifacts, tmp_path, monkeypatch):
    """A rebuild that fails part way (here: the folded graph's builder, after the halves and the repair
    model are written) replaces none of the served model's directories and leaves no staging behind."""
    import serving.repository as repository

    a = artifacts["cifar10"]
    repo = tmp_path / "repo"
    build_repository([ProtectedModel("cifar10", a.export_dir, a.directions)], repo)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(repository, "build_folded_onnx", broken)
    with pytest.raises(OSError, match="disk full"):
        build_repository([ProtectedModel("cifar10", a.export_dir, a.directions, folded=True)], repo)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_a_swap_that_fails_part_way_puts_every_old_directory_back(tmp_path):
    """``_swap_in`` moves the old directories aside before the new ones in; when a move fails (here the
    second model's new directory is missing), the first swap is undone: both old directories are back,
    unchanged, and the error is raised."""
    from serving.repository import _swap_in

    out, staging = tmp_path / "repo", tmp_path / "repo" / ".fire-build-x"
    for name in ("a", "b"):
        (out / name).mkdir(parents=True)
        (out / name / "old").write_text(name)
    staging.mkdir()
    (staging / "a").mkdir()
    (staging / "a" / "new").write_text("a")
    with pytest.raises(FileNotFoundError):
        _swap_in(staging, out, ["a", "b"])
    assert [(out / n / "old").read_text() for n in "ab"] == ["a", "b"] and (staging / "a" / "new").is_file()
    assert not (out / "a" / "new").exists()
    _swap_in(staging, out, ["a"])
    assert (out / "a" / "new").is_file() and (staging / ".replaced" / "a" / "old").is_file()
