"""Rank-k repair, auto-calibration and the efficacy benchmark, on the committed BadNets model and real
CIFAR-10 subsets."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from benchmarks.efficacy import CSV_FIELDS, EfficacyConfig, run_efficacy
from benchmarks.efficacy.run import source_fingerprint
from calibration.augment import views
from calibration.auto import AutoConfig, Scored, Setting, _pick, auto_calibrate_model, settings_for
from calibration.cutsearch import ALPHAS
from calibration.estimators import principal_basis
from calibration.inprocess import ChainRunner, SplitRunner
from fire_backend.directions import DirectionFile, DirectionFileError
from fire_backend.names import PROJECT_ROOT
from fire_backend.repair import Repair
from modelio.export import ExportInfo
from zoo.checkpoint import load_model

from .conftest import MODELS


def _directions(basis: torch.Tensor | None, d: int = 6) -> DirectionFile:
    beta = torch.zeros(d)
    beta[0] = 2.0
    return DirectionFile(beta, torch.zeros(d), 0.0, "layer2", "project", 1.0, "x" * 64, "paired", 5, 5, basis=basis)


def test_principal_basis_is_orthonormal_and_starts_at_the_mean():
    rng = np.random.default_rng(0)
    diffs = rng.normal(size=(40, 12)) + np.array([3.0] + [0.0] * 11)
    b = principal_basis(diffs, 3)
    np.testing.assert_allclose(b @ b.T, np.eye(3), atol=1e-5)
    mean = diffs.mean(0)
    np.testing.assert_allclose(b[0], mean / np.linalg.norm(mean), atol=1e-6)


def test_principal_basis_from_the_gram_matrix_spans_what_the_svd_spans():
    """Fewer rows than columns (pairs x views against a feature map): the basis comes from the N x N Gram
    matrix; it spans the same space as the one from np.linalg.svd."""
    rng = np.random.default_rng(1)
    diffs = rng.normal(size=(30, 400)) * np.linspace(3, 0.1, 400) + 2.0
    b = principal_basis(diffs, 5).astype(np.float64)
    first = diffs.mean(0) / np.linalg.norm(diffs.mean(0))
    residual = diffs - np.outer(diffs @ first, first)
    residual -= residual.mean(0)
    vt = np.linalg.svd(residual, full_matrices=False)[2][:4]
    want = np.vstack([first, vt - np.outer(vt @ first, first)])
    want = np.linalg.qr(want.T)[0].T
    np.testing.assert_allclose(b.T @ b, want.T @ want, atol=1e-5)
    same = np.tile(diffs[:1], (6, 1))  # nothing left over once the mean is out: the mean's direction only
    np.testing.assert_allclose(principal_basis(same, 5), principal_basis(same, 1), atol=1e-6)


def test_rank_k_project_removes_the_subspace_only_from_triggered_samples(tmp_path):
    basis = torch.eye(6)[:2]  # b1 = e0 (= beta / |beta|), b2 = e1
    d = _directions(basis)
    x = torch.tensor([[3.0, 5.0, 1.0, 0, 0, 0], [-1.0, 5.0, 1.0, 0, 0, 0]])
    out = Repair(d)(x)
    torch.testing.assert_close(out[0], torch.tensor([0.0, 0.0, 1.0, 0, 0, 0]))  # s > 0: e0 and e1 removed
    torch.testing.assert_close(out[1], x[1])  # s < 0: untouched
    rank1 = Repair(_directions(None))(x)
    torch.testing.assert_close(rank1[0], torch.tensor([0.0, 5.0, 1.0, 0, 0, 0]))
    d.alpha = 0.5
    torch.testing.assert_close(Repair(d)(x)[0], torch.tensor([1.5, 2.5, 1.0, 0, 0, 0]))
    # the basis survives a round trip through the file, and its checksum covers it
    path = d.save(tmp_path / "d.safetensors")
    loaded = DirectionFile.load(path)
    assert loaded.rank == 2 and np.array_equal(loaded.basis, basis.numpy())


def test_bad_basis_is_refused():
    with pytest.raises(DirectionFileError, match="orthonormal"):
        _directions(torch.ones(2, 6)).validate()
    with pytest.raises(DirectionFileError, match="first row"):
        _directions(torch.eye(6)[1:3]).validate()
    d = _directions(torch.eye(6)[:2])
    d.mode = "gated"
    with pytest.raises(DirectionFileError, match="only used by mode 'project'"):
        d.validate()


def test_chain_runner_equals_the_model():
    model, _ = load_model(MODELS["cifar10"])
    images = np.random.default_rng(0).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    chain = ChainRunner(model, ["layer1", "layer2"])
    one = SplitRunner(model, "layer1")
    from zoo.data import to_tensor_batch

    with torch.inference_mode():
        ref = model(torch.from_numpy(to_tensor_batch(images)))
    torch.testing.assert_close(chain.run(images, []), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chain.run(images, [], stop=0), one.features(images))


def test_pick_prefers_pa_within_the_ca_bound():
    def sc(mode, pa, drop, agreement=90.0):
        return Scored(Setting("layer2", mode, 1.0), pa, 2.0, drop, agreement)

    best, ok = _pick([sc("subtract", 90, 2.0), sc("project", 80, 0.1), sc("gated", 70, 0.0)], 0.5)
    assert ok and best.setting.mode == "project"
    best, ok = _pick([sc("subtract", 90, 2.0), sc("project", 80, 1.0)], 0.5)
    assert not ok and best.setting.mode == "project"  # none feasible: the least harmful


def test_no_search_tries_a_strength_below_one():
    # below 1 a project repair leaves (1 - alpha) of the trigger's component: a stronger trigger brings it back
    tried = {s.alpha for s in settings_for("layer2", AutoConfig())} | set(ALPHAS)
    assert min(tried) >= 1.0


def test_auto_calibration_writes_a_deployable_export(tmp_path, artifacts):
    a = artifacts["cifar10"]
    cfg = AutoConfig(layers=("layer1", "layer2"), alphas=(1.0,), ranks=(1, 2), folds=4)
    result, path = auto_calibrate_model(MODELS["cifar10"], tmp_path / "auto", n_poisoned=24, n_clean=200, config=cfg)
    # per layer: subtract, gated and one project (spatial views fix its rank at the number of views)
    assert len(result.scores) == 2 * 3 and result.feasible and result.best.ca_drop <= 0.5
    assert {s.setting.rank for s in result.scores if s.setting.mode == "project"} == {len(views(cfg.augment))}
    info = ExportInfo.read(tmp_path / "auto")
    d = DirectionFile.load(path, feature_shape=tuple(info.feature_shape), head_sha256=info.head_sha256)
    assert d.layer == info.layer == result.best.setting.layer and d.mode == result.best.setting.mode
    assert (tmp_path / "auto" / "auto_calibration.csv").read_text().count("\n") == len(result.scores) + 1
    # the chosen repair works on test images it never saw
    model, _ = load_model(MODELS["cifar10"])
    runner = SplitRunner(model, d.layer)
    keep = a.test.labels != a.attack.target
    feats = runner.features(a.attack.apply(a.test.images[keep]))
    plain = (runner.labels(feats) == a.attack.target).mean()
    fire = (runner.labels(feats, Repair(d)) == a.attack.target).mean()
    assert plain > 0.8 and fire < 0.15


def test_efficacy_benchmark_end_to_end(tmp_path):
    cfg = EfficacyConfig(
        models=(str(MODELS["cifar10"]),),
        test_limit=300,
        curve=(1, 10, 50),
        auto=AutoConfig(layers=("layer1", "layer2"), alphas=(1.0,), ranks=(1,), folds=3),
        out=str(tmp_path),
    )
    paths = run_efficacy(cfg)
    names = {p.name for p in paths}
    assert {
        "efficacy.csv",
        "efficacy.md",
        "efficacy_cifar10.md",
        "efficacy_pa_vs_n.png",
        "efficacy_defenses.png",
    } <= names
    assert (tmp_path / "efficacy_features_cifar10_resnet_badnets.png").stat().st_size > 10_000
    with (tmp_path / "efficacy.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_FIELDS
        rows = list(reader)
    by = {r["defense"]: r for r in rows if r["group"] == "headline"}
    expected = {"none", "FIRE auto", "FIRE subtract", "FIRE project", "FIRE gated", "random direction"}
    assert expected | {"ShrinkPad-4", "JPEG-50", "median-3x3", "Gaussian-1.0"} == set(by)
    for r in rows:
        assert all(0 <= float(r[k]) <= 100 for k in ("CA", "ASR", "PA")), r
    none, auto, rand = by["none"], by["FIRE auto"], by["random direction"]
    assert float(none["ASR"]) > 80 and float(auto["ASR"]) < 15 and float(auto["PA"]) > 60
    assert float(rand["ASR"]) > 70  # the control: a random direction of the same norm does not repair
    assert {r["group"] for r in rows} == {"headline", "layer", "estimator", "curve", "multilayer"}
    for kind in ("offline", "streaming", "streaming unpaired"):
        assert sorted(int(r["n_poisoned"]) for r in rows if r["defense"] == kind) == [1, 10, 50]
    # a second run with the same config reuses the per-model rows instead of recomputing them
    cached = tmp_path / "efficacy_runs" / "cifar10_resnet_badnets.json"
    stamp = cached.stat().st_mtime_ns
    run_efficacy(cfg)
    assert cached.stat().st_mtime_ns == stamp
    assert json.loads(json.loads(cached.read_text())["config"])["code"] == source_fingerprint(PROJECT_ROOT)


def test_source_fingerprint_follows_the_code_only(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    code, notes = tmp_path / "pkg" / "sub" / "a.py", tmp_path / "pkg" / "notes.md"
    code.write_text("x = 1\n")
    notes.write_text("a")
    before = source_fingerprint(tmp_path, ("pkg",))
    notes.write_text("b")  # not code: the cached rows still hold
    assert source_fingerprint(tmp_path, ("pkg",)) == before
    code.write_text("x = 2\n")  # a changed line of code: they do not
    assert source_fingerprint(tmp_path, ("pkg",)) != before
