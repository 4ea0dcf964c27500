import shutil

import numpy as np
import pytest
import torch

from fire_backend.names import FEATURES, INPUT, LOGITS
from fire_backend.onnx_runtime import onnx_session
from modelio.split import SplitError, check_equivalence, split_at
from modelio.tensorrt import TensorRTUnavailableError, build_tensorrt_engine
from zoo.checkpoint import load_model
from zoo.data import load_dataset, to_tensor_batch

from .conftest import MODELS


@pytest.fixture(scope="module")
def model_and_images():
    model, _ = load_model(MODELS["cifar10"])
    x = torch.from_numpy(to_tensor_batch(load_dataset("cifar10", "test").subset(64, seed=3).images))
    return model, x


@pytest.mark.parametrize("layer", ["stem", "layer1", "layer2", "layer2.0", "layer3", "pool"])
def test_every_single_tensor_cut_reproduces_the_model(model_and_images, layer):
    model, x = model_and_images
    split = split_at(model, layer)
    assert check_equivalence(model, split, x, atol=1e-5) <= 1e-5


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        ("layer2.0.conv1", "tensors to cross"),  # inside a residual block: the skip connection crosses too
        ("layer2.0.bn2", "tensors to cross"),
        ("nope", "no sub-module named"),
        ("fc", "last layer"),
    ],
)
def test_impossible_cuts_are_refused(model_and_images, layer, match):
    with pytest.raises(SplitError, match=match):
        split_at(model_and_images[0], layer)


def test_onnx_halves_match_torch_with_a_dynamic_batch(artifacts):
    a = artifacts["cifar10"]
    assert a.info.onnx_max_abs_err <= 1e-4 and a.info.split_max_abs_err <= 1e-5
    model, _ = load_model(a.model_dir)
    split = split_at(model, a.info.layer)
    head, tail = onnx_session(a.export_dir / "head.onnx"), onnx_session(a.export_dir / "tail.onnx")
    for n in (1, 7, 33):  # batch sizes never seen at export time
        x = to_tensor_batch(a.test.images[:n])
        feats = head.run([FEATURES], {INPUT: x})[0]
        logits = tail.run([LOGITS], {FEATURES: feats})[0]
        with torch.no_grad():
            ref = split.head(torch.from_numpy(x))
            np.testing.assert_allclose(feats, ref.numpy(), atol=1e-4)
            np.testing.assert_allclose(logits, model(torch.from_numpy(x)).numpy(), atol=1e-4)


GPU_MACHINE = torch.cuda.is_available() or shutil.which("nvidia-smi") is not None


@pytest.mark.skipif(GPU_MACHINE, reason="a GPU machine builds engines for real (tests/test_gpu_profile.py)")
def test_tensorrt_build_fails_clearly_without_a_gpu(artifacts, tmp_path):
    from modelio.export import ExportInfo

    info = ExportInfo.read(artifacts["cifar10"].export_dir)
    with pytest.raises(TensorRTUnavailableError, match="no CUDA GPU"):
        build_tensorrt_engine(artifacts["cifar10"].export_dir / "head.onnx", tmp_path, 64,
                              {info.input_name: tuple(info.input_shape)})  # fmt: skip
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_tensorrt_of_another_version_is_refused():
    from modelio.tensorrt import check_tensorrt_version

    check_tensorrt_version("10.5.0.18")
    with pytest.raises(TensorRTUnavailableError, match="TensorRT 10.13.3 found, the serving Triton uses 10.5"):
        check_tensorrt_version("10.13.3")


@pytest.mark.parametrize("layer", ["layer1", "layer2", "layer3"])
def test_vgg_style_cuts_reproduce_the_model(layer):
    from zoo.models import ModelConfig, build_model

    model = build_model(ModelConfig(arch="vgg_small", blocks=2)).eval()
    x = torch.rand(8, 3, 32, 32)
    split = split_at(model, layer)
    assert check_equivalence(model, split, x, atol=1e-5) <= 1e-5
    with pytest.raises(SplitError, match="no sub-module"):
        split_at(model, "stem")
