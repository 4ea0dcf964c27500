import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.dlpack import from_dlpack, to_dlpack

from fire_backend.directions import DirectionFile
from fire_backend.formula import NumpyRepair, folded_inputs
from fire_backend.names import FEATURES
from fire_backend.repair import (
    Repair,
    RepairGraph,
    RepairInputError,
    RepairParams,
    coefficients,
    repaired,
    scores,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


UNGATED = "project, ungated"  # mode project with the file's project_gate off
READOUT = "project, read out"  # mode project, its scores read along a readout (not the directions)


def directions(beta, mu, mode="subtract", alpha=1.0, threshold=0.0) -> DirectionFile:
    return DirectionFile(
        beta=torch.tensor(beta, dtype=torch.float32),
        mu=torch.tensor(mu, dtype=torch.float32),
        threshold=threshold,
        layer="l",
        mode="project" if mode in (UNGATED, READOUT) else mode,
        project_gate=mode != UNGATED,
        alpha=alpha,
        head_sha256="0" * 64,
        estimator="paired",
        n_poisoned=1,
        n_clean=1,
    )


# beta = (3, 4): |beta| = 5, b = (0.6, 0.8); mu = (1, 1); scores s = <x - mu, b> = (0, 5, -1.4)
X = [[1.0, 1.0], [4.0, 5.0], [0.0, 0.0]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("mode", "alpha", "threshold", "expected"),
    [
        ("subtract", 1.0, 0.0, [[-2, -3], [1, 1], [-3, -4]]),
        ("subtract", 0.5, 0.0, [[-0.5, -1], [2.5, 3], [-1.5, -2]]),
        ("project", 1.0, 0.0, [[1, 1], [1, 1], [0, 0]]),  # only row 2 carries the direction (s = 5)
        ("gated", 0.5, 2.0, [[1, 1], [2.5, 3], [0, 0]]),  # only s = 5 > 2 is gated, shifted by 0.5 * beta
        ("gated", 1.0, -2.0, [[-2, -3], [1, 1], [-3, -4]]),  # every s > -2: same as subtract
    ],
)
def test_modes_match_hand_computed_values(device, mode, alpha, threshold, expected):
    r = Repair(directions([3, 4], [1, 1], mode, alpha, threshold), device=device)
    x = torch.tensor(X, device=device)
    assert torch.allclose(r.scores(x).cpu(), torch.tensor([0.0, 5.0, -1.4]), atol=1e-6)
    assert torch.allclose(r(x).cpu(), torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    assert torch.equal(x.cpu(), torch.tensor(X)), "out-of-place repair must not touch its input"


@pytest.mark.parametrize("mode", ["subtract", "project", "gated"])
def test_inplace_repair_reuses_the_input_memory(mode):
    r = Repair(directions([[3.0, 4.0]], [[1.0, 1.0]], mode, threshold=1.0))
    x = torch.tensor([[[4.0, 5.0]]])
    expected = r(x.clone())
    out = r(x, inplace=True)
    assert out.data_ptr() == x.data_ptr()
    assert torch.equal(out, expected) and torch.equal(x, expected)


def test_dlpack_round_trip_is_zero_copy():
    """numpy buffer -> DLPack -> torch -> in-place repair -> DLPack -> numpy: one buffer throughout,
    the path the Triton model takes with pb_utils tensors."""
    arr = np.random.default_rng(0).normal(size=(8, 4, 3, 3)).astype(np.float32)
    ptr = arr.__array_interface__["data"][0]
    beta = np.random.default_rng(1).normal(size=(4, 3, 3)).astype(np.float32)
    r = Repair(directions(beta.tolist(), np.zeros_like(beta).tolist(), "project"))
    expected = r(torch.from_numpy(arr.copy()))
    x = from_dlpack(arr)
    assert x.data_ptr() == ptr
    y = r(x, inplace=True)
    back = np.from_dlpack(from_dlpack(to_dlpack(y)))
    assert y.data_ptr() == ptr and back.__array_interface__["data"][0] == ptr
    np.testing.assert_allclose(back, expected.numpy(), atol=1e-6)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(2, 3), "shape"),
        (torch.zeros(2, 2, dtype=torch.float64), "float32"),
        (torch.tensor([[0.0, float("nan")]]), "NaN"),
        (torch.tensor([[float("inf"), 0.0]]), "NaN or Inf"),
    ],
)
def test_bad_features_are_rejected(x, match):
    with pytest.raises(RepairInputError, match=match):
        Repair(directions([3, 4], [1, 1]))(x)


def test_empty_batch_passes_through():
    assert Repair(directions([3, 4], [1, 1]))(torch.zeros(0, 2)).shape == (0, 2)


vectors = st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=4, max_size=4)


@settings(max_examples=200, deadline=None)
@given(x=st.lists(vectors, min_size=1, max_size=5), beta=vectors, mu=vectors)
def test_project_leaves_no_positive_trigger_component(x, beta, mu):
    if np.linalg.norm(beta) < 1e-3:
        return
    r = Repair(directions(beta, mu, "project"))
    xt = torch.tensor(x)
    before, after = r.scores(xt), r.scores(r(xt))
    tol = 1e-3 * (1 + xt.abs().max().item() + abs(float(r.params.offsets[0])))
    assert torch.all(after <= tol)  # nothing left along +b
    assert torch.allclose(after, before.clamp(max=0), atol=tol)  # and nothing else moved along b


def _rank2(mode: str, alpha: float) -> DirectionFile:
    """beta along e1 + e2 with a second basis row along e3 (orthonormal), in 4-D features."""
    d = directions([3.0, 4.0, 0.0, 0.0], [0.5, -0.5, 0.25, 0.0], mode, alpha, threshold=0.3)
    if d.mode == "project":
        d.basis = np.array([[0.6, 0.8, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], np.float32)
    if mode == READOUT:  # each row reads its direction back whole (readout x basis^T = I), tilted off it
        d.readout = np.array([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.7]], np.float32)
    d.validate()
    return d


@pytest.mark.parametrize("mode", ["subtract", "project", UNGATED, READOUT, "gated"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_exportable_graph_equals_the_inplace_repair(mode, alpha):
    """RepairGraph (out of place, traceable) and Repair (in place) are two forms of one formula."""
    d = _rank2(mode, alpha)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 3
    graph = RepairGraph(d)(x.clone())
    inplace = Repair(d)(x.clone(), inplace=True)
    assert torch.allclose(graph, inplace, atol=1e-5)
    traced = torch.jit.trace(RepairGraph(d), x[:2])  # what the ONNX exporter sees
    assert torch.allclose(traced(x), inplace, atol=1e-5)
    if mode in ("project", UNGATED):  # rank 2: the second direction is removed too, scaled by alpha, where s_1 > 0
        s = x @ torch.tensor([0.6, 0.8, 0.0, 0.0]) - (0.6 * 0.5 - 0.8 * 0.5)
        moved = (s > 0) | (mode == UNGATED)  # ungated: every sample
        assert torch.allclose(inplace[moved, 2], x[moved, 2] - alpha * (x[moved, 2] - 0.25), atol=1e-5)
        assert torch.equal(inplace[~moved], x[~moved]) and (mode == UNGATED) == bool(moved.all())


def test_the_formula_is_array_generic():
    """The same functions compute the same on NumPy arrays and torch tensors."""
    p = RepairParams.from_directions(_rank2(READOUT, 2.0))
    t = p.to(torch.from_numpy)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(scores(x.numpy(), p), scores(x, t).numpy(), atol=1e-6)
    np.testing.assert_allclose(coefficients(scores(x.numpy(), p), p), coefficients(scores(x, t), t).numpy(), atol=1e-6)
    out = repaired(x.numpy(), p)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, repaired(x, t).numpy(), atol=1e-6)


@pytest.mark.parametrize("mode", ["subtract", "project", UNGATED, READOUT, "gated"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_the_numpy_serving_form_equals_the_torch_forms(mode, alpha):
    """The CPU repair model's NumPy form, in place and row by row, against torch in place and the graph."""
    d = _rank2(mode, alpha)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(2)) * 3
    arr = x.numpy().copy()
    ptr = arr.__array_interface__["data"][0]
    out, s = NumpyRepair(d).repair_with_scores(arr, inplace=True)
    assert out.__array_interface__["data"][0] == ptr  # edited where it lay
    np.testing.assert_allclose(out, Repair(d)(x.clone()).numpy(), atol=1e-5)
    np.testing.assert_allclose(out, RepairGraph(d)(x.clone()).numpy(), atol=1e-5)
    np.testing.assert_allclose(s, Repair(d).scores(x).numpy(), atol=1e-5)
    assert NumpyRepair(d).changed(s) == Repair(d).changed(torch.from_numpy(s))
    with pytest.raises(RepairInputError, match="NaN"):
        NumpyRepair(d)(np.full((1, 4), np.nan, np.float32))


@pytest.mark.parametrize("mode", ["subtract", "project", UNGATED, READOUT, "gated"])
def test_the_folded_graph_with_parameter_inputs_equals_the_others(mode, tmp_path):
    """The folded model's graph takes the parameters as inputs, with a dynamic rank axis: the exported
    graph, fed a rank-2 file and then a rank-1 file, computes what the other forms compute, and its
    first score is the metrics' score."""
    import onnxruntime as ort

    from modelio.fuse import export_repair_inputs_graph

    export_repair_inputs_graph((4,), tmp_path / "r.onnx")
    session = ort.InferenceSession(str(tmp_path / "r.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(3)) * 3
    for d in (_rank2(mode, 1.5), directions([3.0, 4.0, 0.0, 0.0], [0.5, -0.5, 0.25, 0.0], mode, 1.5, 0.3)):
        feed = folded_inputs(RepairParams.from_directions(d))
        out, first = session.run(None, {FEATURES: x.numpy(), **feed})
        np.testing.assert_allclose(out, Repair(d)(x.clone()).numpy(), atol=1e-5)
        np.testing.assert_allclose(first, Repair(d).scores(x).numpy(), atol=1e-5)


def test_huge_but_finite_features_are_not_called_nan():
    """A float32 sum can overflow on finite values; the check accumulates in float64."""
    x = torch.full((2, 2), 3e38)
    assert torch.isfinite(x).all() and not torch.isfinite(x.sum())
    Repair(directions([3, 4], [1, 1])).check(x)  # no error


def test_a_readout_reads_a_shift_along_the_directions_back_whole_and_moves_samples_by_it():
    """With a readout R (R V^T = I), a sample's scores are its coordinates along V past mu, read along R:
    a sample at mu plus any shift in V's span is moved back to mu exactly (project, alpha 1); a sample
    off mu along a direction R ignores (orthogonal to R's rows) is left where it is."""
    d = _rank2(READOUT, 1.0)
    d.project_gate = False
    v, r, mu = d.basis.astype(np.float64), d.readout.astype(np.float64), d.mu.astype(np.float64)
    shifts = np.array([[2.0, -1.0], [0.5, 3.0]]) @ v
    np.testing.assert_allclose(NumpyRepair(d)((mu + shifts).astype(np.float32)), np.tile(mu, (2, 1)), atol=1e-5)
    ignored = np.linalg.svd(r)[2][2:]  # what R does not read
    x = (mu + 2.0 * ignored).astype(np.float32)
    np.testing.assert_allclose(NumpyRepair(d)(x.copy()), x, atol=1e-5)
