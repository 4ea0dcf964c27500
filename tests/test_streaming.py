"""Streaming direction updates against a real tritonserver under load: pending until enough reports,
bounded steps, zero failed requests, rollback, and the version visible in the metrics."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest

from fire_backend.directions import DirectionFile
from serving.repository import ProtectedModel, build_repository
from serving.server import ServerConfig, TritonServer
from serving.streaming import DirectionStream, GuardRails, head_features
from zoo.attacks import make_attack
from zoo.data import load_dataset

from .conftest import fire_fails
from .test_reliability import Load, batch_of, pipeline


@pytest.fixture(scope="module")
def served(artifacts, tmp_path_factory):
    a = artifacts["cifar10"]
    repo = tmp_path_factory.mktemp("stream_repo")
    build_repository([ProtectedModel("cifar10", a.export_dir, a.directions)], repo)
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        yield server, repo, a


def served_version(server) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    line = next(x for x in text.splitlines() if x.startswith('fire_direction_version{model="cifar10_fire"}'))
    return float(line.split()[-1])


def test_streaming_updates_guard_rails_and_rollback(served, capsys):
    server, repo, a = served
    stream = DirectionStream(server.metrics_url, repo, "cifar10_fire")
    train = load_dataset("cifar10", "train").subset(400, seed=11)
    images = train.images[train.labels != 0]
    badnets = make_attack("badnets")
    feats = head_features(server.grpc_url, repo, "cifar10_fire", badnets.apply(images[:60]))
    x = batch_of(a)
    v1 = stream.current()

    with Load(server.grpc_url, x) as load:
        r = stream.update(feats[:5])  # fewer than min_samples: nothing changes
        assert r.status == "pending" and r.version == 1 and stream.current().version == 1
        r = stream.update(feats[5:40], head_features(server.grpc_url, repo, "cifar10_fire", images[100:160]))
        assert r.status == "updated" and r.version == 2 and r.step <= 0.5 and r.cosine > 0.9
        load.wait_for(5)  # answers after the update
    for log in load.log:
        assert log and [e for _, _, e in log if e] == [], "a request failed during the update"
    v2 = stream.current()
    assert v2.version == 2 and v2.estimator == "streaming" and v2.n_poisoned == v1.n_poisoned + 40
    np.testing.assert_allclose(load.log[0][-1][1], pipeline(a, x, v2), atol=1e-4)  # the new file serves
    assert served_version(server) == 2  # reload_directions waited for the server to report the new file

    # a very different report (another trigger) is clipped to the allowed step
    blended = head_features(server.grpc_url, repo, "cifar10_fire", make_attack("blended").apply(images[:30]))
    r = stream.update(blended, rails=GuardRails(max_step=0.05))
    assert r.status == "updated" and r.clipped and r.proposed_step > 0.05 and r.step == pytest.approx(0.05)
    v3 = stream.current()
    step = float(np.linalg.norm(v3.beta - v2.beta) / np.linalg.norm(v2.beta))
    assert step == pytest.approx(0.05, rel=1e-3)

    # bad reports are refused before anything changes
    with pytest.raises(ValueError, match="finite"):
        stream.update(np.full_like(feats[:12], np.nan))
    assert stream.current().version == 3

    assert stream.rollback().version == 2
    from clients import FireClient

    np.testing.assert_allclose(FireClient(server.grpc_url).infer("cifar10", x), pipeline(a, x, v2), atol=1e-4)
    assert stream.rollback(1).version == 1
    np.testing.assert_allclose(FireClient(server.grpc_url).infer("cifar10", x), pipeline(a, x, v1), atol=1e-4)
    with pytest.raises(ValueError, match="no version 9"):
        stream.rollback(9)
    events = [e["event"] for e in stream.history()]
    assert events == ["pending", "updated", "updated", "rollback", "rollback"]

    # the CLI drives the same loop: an update from an .npz of reported images lands as a new version
    npz = repo.parent / "reports.npz"
    np.savez(npz, images=badnets.apply(images[60:80]))
    from fire_cli.main import main

    main(["update", "--url", server.grpc_url, "--metrics-url", server.metrics_url, "--repo", str(repo),
          "--model", "cifar10", "--poisoned", str(npz)])  # fmt: skip
    d = DirectionFile.load(repo / "cifar10_fire" / "1" / "directions.safetensors")
    assert d.version == 4 and d.updates == 1  # after the rollback to v1, numbering continues past v3
    err = fire_fails(["rollback", "--repo", str(repo), "--model", "cifar10", "--metrics-url", server.metrics_url,
                      "--to", "9"], capsys)  # fmt: skip
    assert "no version 9" in err  # a clear message, not a traceback
