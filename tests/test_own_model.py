"""Bring your own model: ONNX files and Triton repository entries FIRE did not export itself, with
tensor names as real exports have them, a UINT8 NHWC input, a 224x224 network, a torch factory; cuts,
bad input, and drop-in serving checked with plain tritonclient code written for the original model."""

from __future__ import annotations

import re
import shutil
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from calibration.calibrate import CalibrationConfig, CalibrationSet
from fire_backend.directions import DirectionFile
from fire_backend.onnx_runtime import onnx_session
from fire_backend.repair import Repair
from fire_cli.main import main
from modelio.onnx_graph import OnnxGraph, OnnxModelError
from modelio.preprocess import Preprocess, PreprocessError, infer_preprocess
from serving.entry import EntryError, read_entry
from serving.protect import ProtectConfig, protect_onnx
from serving.server import ServerConfig, TritonServer
from zoo.checkpoint import load_model
from zoo.data import load_dataset

from .conftest import MODELS, fire_fails

FLOAT_NAMES = ("input.1", "logits:0")  # as torch.onnx.export and TF exports name them
UINT8_NAMES = ("x", "save/scale_0.tmp_1")  # as Paddle and TF-converted graphs name them


class Uint8NHWC(nn.Module):
    """A classifier that takes raw uint8 pixels, channels last (as many deployed models do)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2).float() / 255)


def _export(model: nn.Module, example: torch.Tensor, path: Path, names: tuple[str, str]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=13, input_names=[names[0]],
                          output_names=[names[1]], dynamic_axes={names[0]: {0: "N"}, names[1]: {0: "N"}})  # fmt: skip
    return path


def _entry(repo: Path, name: str, onnx_file: Path, dtype: str, dims: list[int], fmt: str, names) -> Path:
    """A Triton repository entry as a user would have written it for onnxruntime."""
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.onnx").write_bytes(onnx_file.read_bytes())
    (repo / name / "config.pbtxt").write_text(
        textwrap.dedent(f"""\
        name: "{name}"
        platform: "onnxruntime_onnx"
        max_batch_size: 16
        input [ {{ name: "{names[0]}" data_type: {dtype} format: {fmt} dims: {dims} }} ]
        output [ {{ name: "{names[1]}" data_type: TYPE_FP32 dims: [ 10 ] }} ]
        """)
    )
    return repo


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The committed BadNets ResNet as two ONNX files a user might have, and calibration image folders."""
    tmp = tmp_path_factory.mktemp("user")
    model, meta = load_model(MODELS["cifar10"])
    models = {
        "float": _export(model, torch.zeros(2, 3, 32, 32), tmp / "float.onnx", FLOAT_NAMES),
        "uint8": _export(Uint8NHWC(model), torch.zeros(2, 32, 32, 3, dtype=torch.uint8), tmp / "u8.onnx", UINT8_NAMES),
    }
    from zoo.attacks import attack_from_spec

    attack = attack_from_spec(meta["attack"])
    train = load_dataset("cifar10", "train").subset(500, seed=11)
    for i, (img, y) in enumerate(zip(train.images[:300], train.labels[:300], strict=True)):
        (tmp / "clean" / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp / "clean" / str(y) / f"{i}.png")
    (tmp / "flagged").mkdir()
    rest = train.images[300:][train.labels[300:] != attack.target][:100]
    for i, img in enumerate(attack.apply(rest)):
        Image.fromarray(img).save(tmp / "flagged" / f"{i}.png")
    test = load_dataset("cifar10", "test").subset(200, seed=4)
    keep = test.labels != attack.target
    return {"tmp": tmp, "models": models, "attack": attack, "clean": tmp / "clean", "flagged": tmp / "flagged",
            "test": test.images[:40], "triggered": attack.apply(test.images[keep][:40])}  # fmt: skip


def test_onnx_cuts_are_single_tensor_cuts_and_bad_cuts_name_the_nearby_ones(user):
    g = OnnxGraph(user["models"]["float"])
    assert (g.input.name, g.output.name, g.input.dtype) == (*FLOAT_NAMES, "float32")
    cuts = [c.tensor for c in g.cuts()]
    assert len(cuts) >= 8 and all("Add" in c or "Relu" in c or "Conv" in c or "/" in c for c in cuts)
    inside = next(n.output[0] for n in g.nodes if n.op_type == "Conv" and "layer2" in n.name and "conv1" in n.name)
    with pytest.raises(OnnxModelError, match="would need 2 tensors to cross.*valid cuts nearby"):
        g.check_cut(inside)
    with pytest.raises(OnnxModelError, match="is not a tensor computed from the input"):
        g.check_cut("no_such_tensor")


def test_split_keeps_names_opset_and_dynamic_batch(user, tmp_path):
    g = OnnxGraph(user["models"]["uint8"])
    cut = g.cuts()[len(g.cuts()) // 2].tensor
    head, tail = g.split(cut, tmp_path)
    h, t = onnx.load(str(head)), onnx.load(str(tail))
    assert [i.name for i in h.graph.input] == ["x"] and [o.name for o in t.graph.output] == ["save/scale_0.tmp_1"]
    assert h.opset_import[0].version == t.opset_import[0].version == 13
    assert h.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    whole = onnx_session(user["models"]["uint8"]).run(None, {"x": x})[0]
    feats = onnx_session(head).run(None, {"x": x})[0]
    np.testing.assert_allclose(onnx_session(tail).run(None, {"FEATURES": feats})[0], whole, atol=1e-5)


def test_a_model_with_two_outputs_or_an_unsplittable_entry_is_refused_with_the_reason(user, tmp_path):
    class Two(nn.Module):
        def forward(self, x):
            return x.mean(1), x.amax(1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Two(), (torch.zeros(1, 3, 8, 8),), str(tmp_path / "two.onnx"), dynamo=False,
                          input_names=["a"], output_names=["b", "c"])  # fmt: skip
    with pytest.raises(OnnxModelError, match="one input and one output"):
        OnnxGraph(tmp_path / "two.onnx")
    (tmp_path / "repo" / "py" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "py" / "config.pbtxt").write_text('name: "py" backend: "python" max_batch_size: 4')
    with pytest.raises(EntryError, match="cannot be split by FIRE"):
        read_entry(tmp_path / "repo", "py")


def test_preprocessing_is_declared_and_checked():
    p = infer_preprocess(("N", 32, 32, 3), "uint8")
    assert (p.layout, p.dims, p.input_range()) == ("NHWC", (32, 32, 3), None)
    q = infer_preprocess((None, 3, 224, 224), "float32", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    lo, hi = q.input_range()
    assert lo == pytest.approx(-0.485 / 0.229, rel=1e-5) and hi == pytest.approx((1 - 0.406) / 0.225, rel=1e-5)
    with pytest.raises(PreprocessError, match="dynamic size"):
        infer_preprocess((None, 3, None, None), "float32")
    with pytest.raises(PreprocessError, match="declared preprocessing"):
        Preprocess(32, 32, layout="NHWC").check_fits(("N", 3, 32, 32), "float32", "model.onnx")
    with pytest.raises(PreprocessError, match="the model takes 32x32"):
        Preprocess(32, 32).apply(np.zeros((1, 16, 16, 3), np.uint8))


def test_protect_cli_refuses_wrong_size_images_naming_the_file(user, tmp_path, capsys):
    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(big / "a.png")
    argv = ["protect", "--onnx", str(user["models"]["float"]), "--clean", str(big), "--poisoned",
            str(user["flagged"]), "--out", str(tmp_path / "repo"), "--work-dir", str(tmp_path / "w")]  # fmt: skip
    err = fire_fails(argv, capsys)
    assert re.search(r"a\.png: 64x64 pixels, the model takes 32x32.*--resize", err), err


def test_torch_factory_with_safetensors_weights(user, tmp_path, capsys):
    """`package.module:factory` + weights: cut with torch.fx at a sub-module, halves exported to ONNX. Clean
    images given as the flagged ones draw a warning that they may carry no trigger; triggered ones none."""
    for flagged, model in ((user["flagged"], "tm"), (user["clean"], "tm_clean")):
        main(["protect", "--torch", "zoo.models:ResNetSmall", "--num-classes", "10",
              "--weights", str(MODELS["cifar10"] / "model.safetensors"), "--input-size", "32x32", "--cut", "layer2",
              "--clean", str(user["clean"]), "--poisoned", str(flagged), "--model", model,
              "--out", str(tmp_path / "repo"), "--work-dir", str(tmp_path / "w")])  # fmt: skip
        out = capsys.readouterr().out
        assert ("warning: the model sends" in out and "may carry no trigger" in out) == (model == "tm_clean"), out
    d = DirectionFile.load(tmp_path / "w" / "tm" / "directions.safetensors")
    assert d.layer == "layer2" and d.estimator == "unpaired" and d.feature_shape == (32, 16, 16)
    names = {p.name for p in (tmp_path / "repo").iterdir()}
    assert {"tm", "tm_head", "tm_fire", "tm_tail", "tm_guard"} <= names


def _raw_clients(server, model: str, names, x: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """What a client written for the original model sends: its own tensor names, plain tritonclient."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    out = {}
    for proto, lib, url in (("http", httpclient, server.http_url), ("grpc", grpcclient, server.grpc_url)):
        client = lib.InferenceServerClient(url)
        inp = lib.InferInput(names[0], list(x.shape), dtype)
        inp.set_data_from_numpy(x)
        result = client.infer(model, [inp], outputs=[lib.InferRequestedOutput(names[1])], headers=server.headers(proto))
        out[proto] = result.as_numpy(names[1])
    return out


def _local(export_dir: Path, directions: Path, x: np.ndarray, input_name: str) -> np.ndarray:
    feats = onnx_session(export_dir / "head.onnx").run(None, {input_name: x})[0]
    repaired = Repair(DirectionFile.load(directions))(torch.from_numpy(feats)).numpy()
    return onnx_session(export_dir / "tail.onnx").run(None, {"FEATURES": repaired})[0]


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["float", "uint8"])
def test_protected_repository_entry_is_a_drop_in(user, tmp_path, kind):
    """`fire protect --repo R --model classifier`: the new `classifier` answers the original's clients
    (same names, dtype, dims, HTTP and gRPC), equals the local head -> repair -> tail, and lowers ASR."""
    if kind == "float":
        names, dtype, dims, fmt, pixels = FLOAT_NAMES, "TYPE_FP32", [3, 32, 32], "FORMAT_NCHW", "FP32"
    else:
        names, dtype, dims, fmt, pixels = UINT8_NAMES, "TYPE_UINT8", [32, 32, 3], "FORMAT_NHWC", "UINT8"
    src = _entry(tmp_path / "src", "classifier", user["models"][kind], dtype, dims, fmt, names)
    (src / "other" / "1").mkdir(parents=True)  # another model in the user's repository: copied as it is
    (src / "other" / "config.pbtxt").write_text('name: "other" backend: "python" max_batch_size: 1')
    out = tmp_path / "out"
    # the float entry's cut is chosen by the search; the uint8 one names it (the last layer2 output), the
    # other way a user runs `fire protect`, and the search's cost once instead of twice
    cut = [] if kind == "float" else ["--cut", [c.tensor for c in OnnxGraph(user["models"][kind]).cuts()
                                                if c.dims[1:] == (32, 16, 16)][-1]]  # fmt: skip
    main(["protect", "--source-repo", str(src), "--source-model", "classifier", "--clean", str(user["clean"]),
          "--poisoned", str(user["flagged"]), "--out", str(out), "--work-dir", str(tmp_path / "w"), *cut])  # fmt: skip
    twin = (out / "classifier_unprotected" / "config.pbtxt").read_text()  # CPU profile: ONNX in the Python backend
    gpu_twin = (out / "classifier_unprotected" / "configs" / "gpu.pbtxt").read_text()  # the original config, renamed
    assert 'name: "classifier_unprotected"' in twin and 'backend: "python"' in twin and (out / "other").is_dir()
    assert 'name: "classifier_unprotected"' in gpu_twin and "onnxruntime_onnx" in gpu_twin
    assert "max_batch_size: 16" in twin and "max_batch_size: 16" in gpu_twin
    served = (out / "classifier" / "config.pbtxt").read_text()
    assert f'name: "{names[0]}"' in served and f'name: "{names[1]}"' in served and "max_batch_size: 16" in served
    shutil.rmtree(out / "other")  # the user's other model: a Python-backend config without its model.py
    pre = infer_preprocess((None, *dims), "uint8" if kind == "uint8" else "float32")
    x = pre.apply(np.concatenate([user["test"][:6], user["triggered"][:10]]))  # the entry's max_batch_size: 16
    with TritonServer(ServerConfig(out, http_port=0, grpc_port=0, metrics_port=0)) as server:
        answers = _raw_clients(server, "classifier", names, x, pixels)
        twin_answers = _raw_clients(server, "classifier_unprotected", names, x, pixels)
    export = tmp_path / "w" / "classifier"
    local = _local(export, export / "directions.safetensors", x, names[0])
    for logits in answers.values():
        np.testing.assert_allclose(logits, local, atol=1e-4)
    original = onnx_session(user["models"][kind]).run(None, {names[0]: x})[0]
    np.testing.assert_allclose(twin_answers["grpc"], original, atol=1e-4)  # the twin serves the original as it was
    asr = lambda logits: (logits[6:].argmax(1) == user["attack"].target).mean()  # noqa: E731
    assert asr(original) > 0.8 and asr(answers["grpc"]) <= asr(original) / 2  # unpaired, 100 flagged images


@pytest.mark.integration
def test_224_model_split_and_served_equals_the_original_with_alpha_0(tmp_path):
    """A ResNet-18 at 3x224x224 (random weights), cut mid-network: served with an identity repair
    (alpha 0) it answers exactly what onnxruntime gives for the original (1e-4)."""
    from benchmarks.own_model.large import large_onnx

    path = large_onnx(tmp_path / "r18.onnx", input_name="pixel_values", output_name="logits")
    graph = OnnxGraph(path)
    cut = [c.tensor for c in graph.cuts() if c.dims[1:] == (128, 28, 28)][-1]  # after layer2 (its last block)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 224, 224, 3), dtype=np.uint8)
    pre = infer_preprocess(graph.input.dims, "float32", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    from zoo.attacks import make_attack

    data = CalibrationSet.with_trigger(images, make_attack("badnets"), n_poisoned=8, n_clean=16)
    cfg = ProtectConfig("big", tmp_path / "repo", tmp_path / "w", cut=cut, calibration=CalibrationConfig(alpha=0.0))
    r = protect_onnx(path, pre, data, cfg)
    assert r.export.split_max_abs_err <= 1e-5 and r.directions.alpha == 0.0
    x = pre.apply(rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8))
    with TritonServer(ServerConfig(tmp_path / "repo", http_port=0, grpc_port=0, metrics_port=0)) as server:
        from clients import FireClient

        served = FireClient(server.grpc_url).infer("big", x, "pixel_values", "logits")
    np.testing.assert_allclose(served, onnx_session(path).run(None, {"pixel_values": x})[0], atol=1e-4)
