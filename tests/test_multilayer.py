"""Multi-layer repair served by a real tritonserver: head -> fire -> mid -> fire2 -> tail equals the
same chain computed locally with torch, and both direction files are bound to their producers."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.inprocess import ChainRunner
from clients import FireClient
from fire_backend.directions import DirectionFile, DirectionFileError
from fire_backend.repair import Repair
from fire_cli.main import main
from modelio.export import ExportInfo
from serving.repository import ProtectedModel, build_repository
from serving.server import ServerConfig, TritonServer
from zoo.checkpoint import load_model
from zoo.data import to_tensor_batch

from .conftest import MODELS, triggered_subset


def test_two_layer_repair_served_end_to_end(tmp_path, artifacts):
    a = artifacts["cifar10"]
    exp = tmp_path / "export"
    main(["export", "--model-dir", str(MODELS["cifar10"]), "--cut", "layer1", "--cut2", "layer2", "--out", str(exp)])
    main(["calibrate", "--export", str(exp), "--n-poisoned", "100", "--n-clean", "300"])
    info = ExportInfo.read(exp)
    d1 = DirectionFile.load(exp / "directions.safetensors", head_sha256=info.head_sha256)
    d2 = DirectionFile.load(exp / "directions2.safetensors", head_sha256=info.mid_sha256)
    assert (d1.layer, d2.layer) == ("layer1", "layer2") and list(d2.feature_shape) == info.feature2_shape
    with pytest.raises(ValueError, match="second layer"):  # a two-layer export needs both files
        build_repository([ProtectedModel("ml", exp, exp / "directions.safetensors")], tmp_path / "bad")
    with pytest.raises(DirectionFileError):  # the files are not interchangeable
        build_repository(
            [ProtectedModel("ml", exp, exp / "directions.safetensors", directions2=exp / "directions.safetensors")],
            tmp_path / "bad2",
        )
    repo = tmp_path / "repo"
    main(["build-repo", "--entry", "ml", str(exp), f"{exp}/directions.safetensors,{exp}/directions2.safetensors",
          "--out", str(repo), "--plain"])  # fmt: skip
    steps = {"ml_head", "ml_fire", "ml_mid", "ml_fire2", "ml_tail", "ml_guard"}  # guard: the GPU profile's input check
    assert {p.name for p in repo.iterdir()} == {"ml", "ml_plain", *steps}
    both = {"directions": exp / "directions.safetensors", "directions2": exp / "directions2.safetensors"}
    build_repository([ProtectedModel("ml", exp, fused=True, plain=True, **both)], repo)  # + ml_fused: both folded in

    trig, labels = triggered_subset(a, 60)
    x = to_tensor_batch(np.concatenate([a.test.images[:20], trig]))
    model, _ = load_model(MODELS["cifar10"])
    chain = ChainRunner(model, ["layer1", "layer2"])
    images = np.concatenate([a.test.images[:20], trig])
    local = chain.run(images, [Repair(d1), Repair(d2)]).numpy()
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        c = FireClient(server.grpc_url, "grpc")
        served, plain, fused = c.infer("ml", x), c.infer("ml_plain", x), c.infer("ml_fused", x)
    np.testing.assert_allclose(served, local, atol=1e-4)
    np.testing.assert_allclose(fused, local, atol=1e-4)
    np.testing.assert_allclose(plain, chain.run(images, []).numpy(), atol=1e-4)
    asr_plain = (plain[20:].argmax(1) == a.attack.target).mean()
    asr_fire = (served[20:].argmax(1) == a.attack.target).mean()
    assert asr_plain > 0.8 and asr_fire < 0.15
