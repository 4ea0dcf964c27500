"""One repair formula, three places it runs: the fused ONNX graph, the served ensemble (the repair model
editing features in place) and the local torch pipeline agree for every mode, alpha and rank."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch

from calibration import HeadFeatures
from calibration.calibrate import zoo_calibration_set
from calibration.factory import FitInputs, fit_directions
from clients import FireClient
from fire_backend.directions import DirectionFile
from fire_backend.names import FEATURES, HEAD_ONNX, INPUT, LOGITS, TAIL_ONNX
from fire_backend.onnx_runtime import onnx_session
from fire_backend.repair import Repair
from modelio.fuse import _repair_graph, build_fused_onnx
from serving.repository import ProtectedModel, Variant, build_repository
from serving.server import ServerConfig, TritonServer
from zoo.data import to_tensor_batch

from .conftest import triggered_subset

SETTINGS = [(m, a, 1) for m in ("subtract", "gated") for a in (0.5, 1.0, 2.0)] + [
    ("project", a, r) for a, r in itertools.product((0.5, 1.0, 2.0), (1, 2))
]


def _suffix(mode: str, alpha: float, rank: int) -> str:
    return f"{mode}_a{str(alpha).replace('.', 'p')}_r{rank}"


@pytest.fixture(scope="module")
def settings_files(artifacts, tmp_path_factory):
    """A direction file per (mode, alpha, rank), fitted on paired training samples at the export's layer."""
    a = artifacts["cifar10"]
    out = tmp_path_factory.mktemp("settings")
    pool = zoo_calibration_set(a.info.dataset, a.attack, 50, 200, seed=3)
    head = HeadFeatures(a.export_dir)
    feats = [torch.from_numpy(head(x)) for x in (pool.originals, pool.triggered, pool.clean)]
    files = {}
    for mode, alpha, rank in SETTINGS:
        d = fit_directions(FitInputs(*feats), a.info.layer, mode, alpha, rank, head_sha256=a.info.head_sha256)
        files[(mode, alpha, rank)] = d.save(out / f"{_suffix(mode, alpha, rank)}.safetensors")
    return files


def _images(a) -> np.ndarray:
    return to_tensor_batch(np.concatenate([a.test.images[:16], triggered_subset(a, 16)[0]]))


def _local(a, x: np.ndarray, directions) -> np.ndarray:
    """head (ONNX) -> the in-place serving repair (torch) -> tail (ONNX)."""
    feats = torch.from_numpy(onnx_session(a.export_dir / "head.onnx").run([FEATURES], {INPUT: x})[0])
    repaired = Repair(DirectionFile.load(directions))(feats, inplace=True).numpy()
    return onnx_session(a.export_dir / "tail.onnx").run([LOGITS], {FEATURES: repaired})[0]


@pytest.mark.parametrize("setting", SETTINGS, ids=[_suffix(*s) for s in SETTINGS])
def test_fused_graph_equals_head_repair_tail(artifacts, settings_files, tmp_path, setting):
    a = artifacts["cifar10"]
    path = build_fused_onnx(a.export_dir, settings_files[setting], tmp_path / "fused.onnx")
    assert [i.name for i in onnx.load(str(path)).graph.input] == [INPUT]
    x = _images(a)
    expected = _local(a, x, settings_files[setting])
    for n in (1, len(x)):  # dynamic batch survives the stitching
        np.testing.assert_allclose(onnx_session(path).run([LOGITS], {INPUT: x[:n]})[0], expected[:n], atol=1e-4)
    if setting[1] != 1.0 or setting[2] != 1:  # the setting changes the answer: a dropped alpha or basis shows
        unit = _local(a, x, settings_files[(setting[0], 1.0, 1)])
        assert np.abs(unit - expected).max() > 1e-2


def _optimized_nodes(model: onnx.ModelProto, tmp_path) -> int:
    """How many nodes onnxruntime runs for ``model`` after its graph optimizations (layout, fusions)."""
    import onnxruntime as ort

    src, dst = tmp_path / "src.onnx", tmp_path / "optimized.onnx"
    onnx.save(model, str(src))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3  # the layout warning about saving an NCHWc-optimized graph
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return len(onnx.load(str(dst)).graph.node)


def test_the_fused_graph_keeps_the_halves_optimizations(artifacts, settings_files, tmp_path):
    """Stitched, the tail loses none of the fusions onnxruntime applies to it on its own (its residual Add
    and ReLU folded into a convolution need the batch axis the repair's output shares with its input)."""
    a = artifacts["cifar10"]
    d = DirectionFile.load(settings_files[("project", 1.0, 2)])
    fused = onnx.load(str(build_fused_onnx(a.export_dir, settings_files[("project", 1.0, 2)], tmp_path / "f.onnx")))
    parts = [onnx.load(str(a.export_dir / "head.onnx")), onnx.load(str(a.export_dir / "tail.onnx"))]
    repair = onnx.helper.make_model(_repair_graph(d, None, tmp_path / "r.onnx"), opset_imports=fused.opset_import)
    separate = sum(_optimized_nodes(m, tmp_path) for m in [*parts, repair])
    assert _optimized_nodes(fused, tmp_path) <= separate


def test_fused_ensemble_and_local_agree_on_a_server(artifacts, settings_files, tmp_path):
    """Every setting served twice on one server, as an ensemble (repair model) and fused: both equal the
    local pipeline."""
    a = artifacts["cifar10"]
    variants = tuple(Variant(_suffix(*s), directions=settings_files[s], fused=True) for s in SETTINGS)
    repo = tmp_path / "repo"
    build_repository([ProtectedModel("f", a.export_dir, a.directions, variants=variants)], repo)
    x = _images(a)
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        c = FireClient(server.grpc_url, "grpc")
        for setting in SETTINGS:
            expected = _local(a, x, settings_files[setting])
            np.testing.assert_allclose(c.infer(f"f_{_suffix(*setting)}", x), expected, atol=1e-4, err_msg=str(setting))
            np.testing.assert_allclose(c.infer(f"f_{_suffix(*setting)}_fused", x), expected, atol=1e-4)


class _OldOpsetNet(torch.nn.Module):
    """A user's model exported at an older opset, with the ops whose versions moved since (Reshape,
    BatchNormalization)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.fc = torch.nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.nn.functional.avg_pool2d(self.conv(x), 2).reshape(-1, 8 * 8 * 8))


@pytest.mark.parametrize("opset", [11, 13])
def test_fused_and_folded_keep_an_older_models_opset(tmp_path, opset):
    """A model exported at an older opset than FIRE's own: the fused and the folded graph declare the
    model's opset, validate, and compute head -> repair -> tail (a repair exported at FIRE's opset would
    not validate beside the model's nodes: Reshape's allowzero is opset 14's)."""
    from calibration.factory import make_directions
    from fire_backend.formula import RepairParams, folded_inputs
    from modelio.export import export_onnx_model
    from modelio.fuse import build_folded_onnx
    from modelio.preprocess import Preprocess

    export = tmp_path / "export"
    head_onnx, tail_onnx = export / HEAD_ONNX, export / TAIL_ONNX
    torch.manual_seed(0)
    net = _OldOpsetNet().eval()
    axes = {"img": {0: "n"}, "out": {0: "n"}}
    torch.onnx.export(net, (torch.zeros(2, 3, 16, 16),), str(tmp_path / "m.onnx"), dynamo=False, opset_version=opset,
                      input_names=["img"], output_names=["out"], dynamic_axes=axes)  # fmt: skip
    export.mkdir()
    cut = next(n.output[0] for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "Relu")
    info = export_onnx_model(tmp_path / "m.onnx", cut, export, Preprocess(16, 16))
    x, others = np.split(np.random.default_rng(0).random((26, 3, 16, 16), dtype=np.float32), [6])
    feats, clean = (onnx_session(head_onnx).run([FEATURES], {"img": a})[0] for a in (x, others))
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.standard_normal((feats[0].size, 2)))[0].T.reshape(2, *feats.shape[1:])
    d = make_directions(basis[0] * 3, torch.from_numpy(clean), layer=cut, basis=basis.astype(np.float32),
                        head_sha256=info.head_sha256)  # fmt: skip
    assert d.readout is not None  # the folded graph is fed one
    d.save(tmp_path / "d.safetensors")
    repaired = Repair(d)(torch.from_numpy(feats.copy()), inplace=True).numpy()
    expected = onnx_session(tail_onnx).run(["out"], {FEATURES: repaired})[0]
    assert np.abs(expected - onnx_session(tmp_path / "m.onnx").run(["out"], {"img": x})[0]).max() > 1e-3
    fused = build_fused_onnx(export, tmp_path / "d.safetensors", tmp_path / "fused.onnx")
    folded = build_folded_onnx(export, tmp_path / "folded.onnx")
    for path in (fused, folded):
        model = onnx.load(str(path))
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
        onnx.checker.check_model(model)
    np.testing.assert_allclose(onnx_session(fused).run(["out"], {"img": x})[0], expected, atol=1e-4)
    inputs = {"img": x, **folded_inputs(RepairParams.from_directions(d))}
    np.testing.assert_allclose(onnx_session(folded).run(["out"], inputs)[0], expected, atol=1e-4)


def test_a_model_older_than_the_repairs_opset_is_refused_with_a_reason():
    from fire_backend.errors import InvalidInputError
    from modelio.export import ONNX_OPSET
    from modelio.fuse import REPAIR_MIN_OPSET, repair_opset

    old = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []),
                                 opset_imports=[onnx.helper.make_opsetid("", REPAIR_MIN_OPSET - 1)])  # fmt: skip
    with pytest.raises(InvalidInputError, match=f"opset {REPAIR_MIN_OPSET - 1}: a fused or folded model needs"):
        repair_opset(old)
    newer = onnx.helper.make_model(
        onnx.helper.make_graph([], "g", [], []), opset_imports=[onnx.helper.make_opsetid("", 21)]
    )
    assert repair_opset(newer) == ONNX_OPSET
