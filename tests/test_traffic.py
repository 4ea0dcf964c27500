"""FIRE from unlabeled traffic: the bounded statistics, the detector on known structure, and the whole
loop on a real tritonserver (protect in observe mode -> traffic -> fire update --from-traffic)."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from calibration.calibrate import observe_directions
from calibration.traffic import TrafficConfig, propose
from clients import FireClient
from fire_backend.directions import DirectionFile
from fire_backend.formula import NumpyRepair
from fire_backend.names import TRAFFIC_FILE
from fire_backend.traffic import TrafficStats, TrafficStatsError
from serving.repository import ProtectedModel, build_repository
from serving.server import ServerConfig, TritonServer
from zoo.data import load_dataset, to_tensor_batch

from .conftest import fire_fails


def test_stats_are_bounded_uniform_for_one_source_and_survive_a_save(tmp_path):
    rng = np.random.default_rng(0)
    stats = TrafficStats(num_classes=3, feature_size=4, budget=3 * 4 * 2 * 50)  # room for 50 samples a class
    assert stats.capacity == 50
    x = rng.normal(size=(5000, 2, 2)).astype(np.float32)
    x[:, 0, 0], x[:, 0, 1] = np.divmod(np.arange(5000), 64)  # the sample's index (exact in float16)
    y = rng.integers(0, 3, 5000)
    for i in range(0, 5000, 64):
        stats.update(x[i : i + 64], y[i : i + 64])
    assert stats.total == 5000 and stats.reservoir.nbytes == 3 * 50 * 4 * 2
    for c in range(3):
        kept = (stats.samples(c)[:, :2] @ [64, 1]).astype(int)
        assert len(set(kept)) == 50 and set(kept) <= set(np.flatnonzero(y == c))
    late = np.concatenate([stats.samples(c)[:, :2] @ [64, 1] for c in range(3)]) >= 2500
    assert 0.3 < late.mean() < 0.7  # a uniform sample of the whole stream, not its start or its end
    loaded, meta = TrafficStats.load(stats.save(tmp_path / "t.safetensors", {"model": "m"}))
    assert meta == {"model": "m"} and loaded.total == 5000
    np.testing.assert_array_equal(loaded.reservoir, stats.reservoir)
    loaded.update(x[:64], y[:64])  # and it goes on recording where it stopped
    assert loaded.total == 5064 and all(len(loaded.samples(c)) == 50 for c in range(3))


def test_no_source_holds_more_of_a_class_than_another_and_unstorable_features_are_counted_not_kept():
    stats = TrafficStats(num_classes=2, feature_size=4, budget=2 * 4 * 2 * 100)
    stats.update(np.ones((300, 4), np.float32), np.zeros(300, int), ["client"] * 300)
    stats.update(np.zeros((3000, 4), np.float32), np.zeros(3000, int), ["flooder"] * 3000)  # 10x as many
    assert stats.held(0) == {"client": 50, "flooder": 50} and stats.largest_source_share(0) == 0.5
    assert stats.seen[0].tolist()[:2] == [300, 3000]
    stats.update(np.array([[np.nan] * 4, [1e6] * 4, [1.0] * 4], np.float32), np.ones(3, int))
    assert stats.unrecordable == 2 and len(stats.samples(1)) == 1 and np.isfinite(stats.samples(1)).all()


def _synthetic(shift_class: int | None, shared_shift: bool, rng) -> tuple[TrafficStats, np.ndarray, np.ndarray]:
    """Ten classes of Gaussian features; a 'trigger' adds a fixed vector to 20 % of the traffic and (if a
    backdoor) sends it to ``shift_class``; without one, every class gets its own triggered share."""
    d, means = 64, rng.normal(size=(10, 64)) * 3
    trigger = np.zeros(d)
    trigger[:8] = 10.0
    clean_y = rng.integers(0, 10, 1000)
    clean = (means[clean_y] + rng.normal(size=(1000, d))).astype(np.float32)
    y = rng.integers(0, 10, 3000)
    x = means[y] + rng.normal(size=(3000, d))
    hit = rng.random(3000) < 0.2
    if shift_class is not None or shared_shift:
        x[hit] += trigger
    if shift_class is not None:
        y = np.where(hit, shift_class, y)
    stats = TrafficStats(10, d, seed=1)
    stats.update(x.astype(np.float32), y)
    return stats, clean, clean_y


def _backdoor_tail(clean: np.ndarray, clean_y: np.ndarray, target: int = 7):
    means = np.stack([clean[clean_y == c].mean(0) for c in range(10)])

    def tail(f: np.ndarray) -> np.ndarray:  # the backdoored "model": the trigger -> target, else the nearest mean
        f = f.reshape(len(f), -1)
        return np.where(f[:, :8].mean(1) > 5, target, ((f[:, None] - means[None]) ** 2).sum(2).argmin(1))

    return tail


def test_detector_names_the_target_and_ignores_a_shift_every_class_shares():
    stats, clean, clean_y = _synthetic(7, False, np.random.default_rng(3))
    tail = _backdoor_tail(clean, clean_y)
    p = propose(stats, clean, tail(clean), tail, layer="l", head_sha256="x", clean_labels=clean_y)
    assert p.detected and p.target == 7 and p.score > 2 * p.next_score
    assert p.deployable and p.leave_rate > 0.8 and p.other_change <= 0.01, p.checks
    beta = p.directions.beta.reshape(-1)
    assert np.abs(beta[:8]).mean() > 5 * np.abs(beta[8:]).mean()  # the estimate is the trigger's direction

    for shift_class, shared in ((None, False), (None, True)):  # clean traffic; an unlearned trigger everywhere
        stats, clean, clean_y = _synthetic(shift_class, shared, np.random.default_rng(4))
        p = propose(stats, clean, clean_y, lambda f: np.zeros(len(f), int), layer="l", head_sha256="x")
        assert not p.detected and p.directions is None and p.score < TrafficConfig().min_score


def test_a_flooding_source_a_decoy_class_or_huge_features_do_not_blind_the_detector():
    """The three ways issue 18 blinded traffic calibration, on the synthetic backdoor above."""
    rng = np.random.default_rng(3)
    stats, clean, clean_y = _synthetic(7, False, rng)
    tail = _backdoor_tail(clean, clean_y)
    kw = dict(layer="l", head_sha256="x", clean_labels=clean_y)
    baseline = propose(stats, clean, tail(clean), tail, **kw)
    assert baseline.deployable and baseline.target == 7

    flooded, _, _ = _synthetic(7, False, np.random.default_rng(3))  # same traffic ...
    means = np.stack([clean[clean_y == c].mean(0) for c in range(10)])
    dilution = (means[7] + rng.normal(size=(20000, 64))).astype(np.float32)  # ... + 20,000 clean class-7 requests
    flooded.update(dilution, np.full(len(dilution), 7), ["flooder"] * len(dilution))
    p = propose(flooded, clean, tail(clean), tail, **kw)
    assert p.deployable and p.target == 7, [(s.cls, round(s.score, 1)) for s in p.classes]
    assert next(s for s in p.classes if s.cls == 7).largest_share == 0.5  # the flooder holds no more than the rest

    decoy, _, _ = _synthetic(7, False, np.random.default_rng(3))
    basis = np.linalg.qr((means[1:] - means[0]).T)[0]  # the directions the class means differ in
    push = rng.normal(size=64)
    push[:8] = 0  # not the trigger's dims ...
    push -= basis @ (basis.T @ push)  # ... and no class's either: a universal perturbation that flips nothing
    push *= 60 / np.linalg.norm(push)
    shifted = (means[2] + push + rng.normal(size=(400, 64))).astype(np.float32)
    assert (tail(shifted) == 2).all()
    decoy.update(shifted, np.full(400, 2), ["decoy"] * 400)
    p = propose(decoy, clean, tail(clean), tail, **kw)
    ranked = sorted(p.classes, key=lambda s: -s.score)
    assert ranked[0].cls == 2 and 7 in p.examined  # the decoy scores highest, the real target is still examined
    assert p.deployable and p.targets == [2, 7]  # both repaired by one rank-2 file, checked together
    source = rng.choice([c for c in range(10) if c != 7], 300)
    triggered = (means[source] + rng.normal(size=(300, 64))).astype(np.float32)
    triggered[:, :8] += 10.0
    # the real backdoor is repaired: its samples lie nowhere in particular along the decoy's direction (the
    # first), so gating on that would let about a quarter through; the combined file is not gated
    assert p.directions.project_gate is False
    assert (tail(NumpyRepair(p.directions)(triggered)) != 7).mean() > 0.95

    overflow, _, _ = _synthetic(7, False, np.random.default_rng(3))
    overflow.update(np.full((8, 64), 1e6, np.float32), np.zeros(8, int))  # what float16 cannot hold
    assert overflow.unrecordable == 8 and propose(overflow, clean, tail(clean), tail, **kw).deployable
    overflow.reservoir[0, 0, 0] = np.inf  # a poisoned file: fail closed, never "no backdoor"
    with pytest.raises(TrafficStatsError, match="not finite"):
        propose(overflow, clean, tail(clean), tail, **kw)


def test_two_classes_and_a_large_target_class():
    """A two-class model whose target class holds most of the traffic: 10 % of requests triggered are
    only ~16 % of the target class's traffic; the other class is the null it is held against."""
    rng = np.random.default_rng(5)
    d = 64
    means = rng.normal(size=(2, d)) * 3
    trigger = np.zeros(d)
    trigger[:8] = 10.0
    clean_y = (rng.random(600) < 0.6).astype(int) ^ 1  # 60 % class 0
    clean = (means[clean_y] + rng.normal(size=(600, d))).astype(np.float32)
    y = (rng.random(2000) < 0.6).astype(int) ^ 1
    x = means[y] + rng.normal(size=(2000, d))
    hit = (rng.random(2000) < 0.25) & (y == 1)  # 10 % of all requests, all from the other class
    x[hit] += trigger
    y = np.where(hit, 0, y)
    stats = TrafficStats(2, d, seed=1)
    stats.update(x.astype(np.float32), y)

    def tail(f: np.ndarray) -> np.ndarray:
        f = f.reshape(len(f), -1)
        return np.where(f[:, :8].mean(1) > 5, 0, ((f[:, None] - means[None]) ** 2).sum(2).argmin(1))

    assert 0.1 < hit.sum() / (y == 0).sum() < 0.25
    p = propose(stats, clean, tail(clean), tail, layer="l", head_sha256="x", clean_labels=clean_y)
    assert p.detected and p.target == 0 and p.deployable, (p.score, p.checks)
    stats_clean = TrafficStats(2, d, seed=1)
    y2 = (rng.random(2000) < 0.6).astype(int) ^ 1
    stats_clean.update((means[y2] + rng.normal(size=(2000, d))).astype(np.float32), y2)
    assert not propose(stats_clean, clean, tail(clean), tail, layer="l", head_sha256="x").detected


def _samples_recorded(metrics_url: str, tail: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    line = [x for x in text.splitlines() if x.startswith(f'fire_traffic_samples_total{{model="{tail}"}}')]
    return float(line[0].split()[-1]) if line else 0.0


def _send(client: FireClient, images: np.ndarray, server, repo, expected: int) -> None:
    for i in range(0, len(images), 50):
        client.infer("cifar10", to_tensor_batch(images[i : i + 50]))
    deadline = time.monotonic() + 60
    while _samples_recorded(server.metrics_url, "cifar10_tail") < expected or not (
        (repo / "cifar10_tail" / TRAFFIC_FILE).is_file()
        and TrafficStats.load(repo / "cifar10_tail" / TRAFFIC_FILE)[0].total >= expected
    ):
        assert time.monotonic() < deadline, "the tail did not record the traffic"
        time.sleep(0.5)


def test_observe_then_update_from_traffic_on_a_real_server(artifacts, tmp_path, capsys):
    from fire_cli.main import main

    a = artifacts["cifar10"]
    train = load_dataset("cifar10", "train").subset(1000, seed=21)
    observe = tmp_path / "observe.safetensors"
    observe_directions(a.export_dir, observe, train.images)
    repo = tmp_path / "repo"
    build_repository([ProtectedModel("cifar10", a.export_dir, observe, record_traffic=True, metrics="detailed")], repo)
    clean_npz = tmp_path / "clean.npz"
    np.savez(clean_npz, images=train.images, labels=train.labels)
    test = load_dataset("cifar10", "test").subset(1200, seed=22)
    source = test.images[test.labels != a.attack.target]
    probe = a.attack.apply(source[:60])  # held-out triggered images, to see the backdoor before and after
    triggered = a.attack.apply(source[60:100])
    clean = test.images[1200 - 900 :]

    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        client = FireClient(server.grpc_url)
        cli = ["update", "--from-traffic", "--auto", "--repo", str(repo), "--model", "cifar10",
               "--metrics-url", server.metrics_url, "--clean", str(clean_npz)]  # fmt: skip
        _send(client, clean[:500], server, repo, 500)
        main(cli)  # clean traffic: nothing to find, nothing deployed
        assert "no backdoor detected" in capsys.readouterr().out
        assert DirectionFile.load(repo / "cifar10_fire" / "1" / "directions.safetensors").version == 1

        before = client.infer("cifar10", to_tensor_batch(probe)).argmax(1)
        assert (before == a.attack.target).mean() > 0.8  # observe mode changes nothing: the backdoor works
        _send(client, np.concatenate([clean[500:], triggered]), server, repo, 1000)  # 1,000 in all, 10 % triggered
        main(cli)
        out = capsys.readouterr().out
        assert f"backdoor suspected: class {a.attack.target}" in out and "deployed as version 2" in out, out
        d = DirectionFile.load(repo / "cifar10_fire" / "1" / "directions.safetensors")
        assert d.version == 2 and d.estimator == "traffic" and d.alpha > 0
        text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
        per_class = [float(x.split()[-1]) for x in text.splitlines() if x.startswith("fire_traffic_class_samples{")]
        assert len(per_class) == 10 and sum(per_class) == 1000
        after = client.infer("cifar10", to_tensor_batch(probe)).argmax(1)
        assert (after == a.attack.target).mean() < 0.2  # held-out triggered images no longer flip
        clean_test = load_dataset("cifar10", "test").subset(300, seed=1)
        assert (client.infer("cifar10", to_tensor_batch(clean_test.images)).argmax(1) == clean_test.labels).mean() > 0.7

        assert "observe-only direction" in fire_fails(cli, capsys)  # the stats are of repaired features now
        main(["rollback", "--repo", str(repo), "--model", "cifar10", "--metrics-url", server.metrics_url])
        assert (client.infer("cifar10", to_tensor_batch(probe)).argmax(1) == before).all()


def test_fire_protect_observe_serves_an_identity_repair_and_records_traffic(tmp_path, capsys):
    """`fire protect --observe` needs only clean images: alpha 0 (nothing changes) and a recording tail."""
    from fire_backend.names import PARAM_TRAFFIC_STATS
    from fire_cli.main import main
    from serving.configs import read_config
    from serving.repository import served_model

    onnx = Path(__file__).resolve().parent.parent / "models" / "own_mobilenet_v3_small" / "model.onnx"
    train = load_dataset("cifar10", "train").subset(64, seed=5)
    np.savez(tmp_path / "clean.npz", images=train.images)
    repo = tmp_path / "repo"
    main(["protect", "--onnx", str(onnx), "--mean", "0.4914", "0.4822", "0.4465", "--std", "0.2470", "0.2435",
          "0.2616", "--clean", str(tmp_path / "clean.npz"), "--observe", "--model", "mine", "--out", str(repo),
          "--work-dir", str(tmp_path / "work")])  # fmt: skip
    d = served_model(repo, "mine").directions
    assert d.alpha == 0 and d.estimator == "observe"
    assert read_config(repo / "mine_tail").parameters[PARAM_TRAFFIC_STATS].string_value == "1"
    err = fire_fails(["protect", "--onnx", str(onnx), "--clean", str(tmp_path / "clean.npz"), "--out",
                      str(tmp_path / "r2"), "--work-dir", str(tmp_path / "work2")], capsys)  # fmt: skip
    assert "--poisoned" in err  # without --observe, flagged images or a trigger are needed
