import numpy as np
import onnx
import pytest
import torch

from fire_backend.directions import DirectionFile
from fire_backend.export import FEATURES, INPUT, LOGITS, onnx_session
from fire_backend.fuse import build_fused_onnx
from fire_backend.repair import Repair

from .conftest import triggered_subset


@pytest.mark.parametrize("mode", ["subtract", "project", "gated"])
def test_fused_graph_equals_head_repair_tail(artifacts, tmp_path, mode):
    a = artifacts["cifar10"]
    path = build_fused_onnx(a.export_dir, a.directions, tmp_path / "fused.onnx", mode)
    assert [i.name for i in onnx.load(str(path)).graph.input] == [INPUT]
    x = np.concatenate([a.test.images[:16], triggered_subset(a, 16)[0]])
    from fire_backend.data import to_tensor_batch

    x = to_tensor_batch(x)
    feats = onnx_session(a.export_dir / "head.onnx").run([FEATURES], {INPUT: x})[0]
    repaired = Repair(DirectionFile.load(a.directions), mode)(torch.from_numpy(feats)).numpy()
    expected = onnx_session(a.export_dir / "tail.onnx").run([LOGITS], {FEATURES: repaired})[0]
    for n in (1, len(x)):  # dynamic batch survives the stitching
        fused = onnx_session(path).run([LOGITS], {INPUT: x[:n]})[0]
        np.testing.assert_allclose(fused, expected[:n], atol=1e-4)
