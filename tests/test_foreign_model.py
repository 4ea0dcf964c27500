"""A model nobody here wrote, end to end: 32 x 64 (not square), dynamic H and W in the graph, a
data-dependent Reshape, two classes, BGR with its own normalisation, tensor names with '/', images
given as folders. Every step a user runs, through the real CLI and a real server."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from PIL import Image

from benchmarks.own_model.foreign import INPUT_NAME, OUTPUT_NAME, ThirdPartyNet, pairs, to_input
from serving.server import ServerConfig, TritonServer, free_ports
from zoo.attacks import attack_from_spec

from .conftest import fire_fails

PREPROCESS = ["--input-size", "32x64", "--channels", "BGR", "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5"]
TRIGGER = {"name": "badnets", "patch_size": 6, "target": 1}


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """An untrained third-party network exported the way its authors would, and image folders."""
    import torch

    d = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    model = ThirdPartyNet().eval()
    images, labels = pairs("test")
    torch.onnx.export(model, (to_input(images[:2]),), str(d / "model.onnx"), dynamo=False, opset_version=13,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: {0: "N", 2: "H", 3: "W"}, OUTPUT_NAME: {0: "N"}})  # fmt: skip
    attack = attack_from_spec(TRIGGER)
    for folder, imgs, labs in (("clean", images[:80], labels[:80]), ("flagged", attack.apply(images[80:100]), None),
                               ("triggered", attack.apply(images[100:140]), labels[100:140])):  # fmt: skip
        for i, img in enumerate(imgs):
            sub = d / folder / (str(labs[i]) if labs is not None else "")
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(sub / f"{i}.png")
    return d


def test_triggers_fit_a_non_square_image(tmp_path):
    np.save(tmp_path / "patch.npy", np.full((6, 6, 3), 255, np.uint8))
    images = np.zeros((2, 48, 192, 3), np.uint8)
    custom = attack_from_spec({"name": "custom", "pattern": str(tmp_path / "patch.npy"), "row": -1, "col": -1})
    out = custom.apply(images)
    assert out[:, -6:, -6:].min() == 255 and out[:, :, :-6].max() == 0 and out[:, :-6].max() == 0
    for spec in ({"name": "blended"}, {"name": "wanet"}, {"name": "trojan"}, {"name": "sig"}):
        assert attack_from_spec(spec).apply(images).shape == images.shape, spec


def test_layers_shows_static_shapes_at_the_declared_size(foreign, capsys):
    from fire_cli.main import main

    main(["layers", str(foreign / "model.onnx"), *PREPROCESS])
    out = capsys.readouterr().out
    assert "at input (3, 32, 64)" in out and "unk__" not in out and "()" not in out
    assert "64, 16, 32)" in out  # after the stride-2 stage: 32 x 64 / 2
    assert "without a static shape, left out: /Reshape_output_0" in out  # the flatten: skipped, with its reason


@pytest.mark.integration
def test_protect_chooses_a_cut_past_a_data_dependent_reshape_and_serves_it(foreign, tmp_path, capsys):
    """No --cut: FIRE tries every cut (those whose shape only the declared size makes static included),
    then the served model answers with the original's tensor names, and `fire eval` measures it on the
    user's own images."""
    from fire_cli.main import main

    repo = tmp_path / "repo"
    main(["protect", "--onnx", str(foreign / "model.onnx"), *PREPROCESS, "--clean", str(foreign / "clean"),
          "--poisoned", str(foreign / "flagged"), "--model", "orient", "--out", str(repo),
          "--work-dir", str(tmp_path / "w")])  # fmt: skip
    out = capsys.readouterr().out
    assert "protected orient" in out and "<- chosen" in out
    assert "left out, no static shape at the served size (first: /Reshape_output_0" in out  # one line, why
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        from clients import FireClient

        io = FireClient(server.grpc_url).io("orient")
        assert (io.input, io.output, io.shape) == (INPUT_NAME, OUTPUT_NAME, (-1, 3, 32, 64))
        main(["eval", "--url", server.grpc_url, "--repo", str(repo), "--models", "orient", "--clean",
              str(foreign / "clean"), "--triggered", str(foreign / "triggered"), "--target", "1"])  # fmt: skip
        table = capsys.readouterr().out
        assert "| orient |" in table and "80 clean, 40 triggered" in table
        main(["classify", "--url", server.grpc_url, "--repo", str(repo), "--model", "orient",
              str(next((foreign / "flagged").iterdir()))])  # fmt: skip
        assert capsys.readouterr().out.strip().split("\t")[1] in ("0", "1")
        main(["loadtest", "--url", server.grpc_url, "--repo", str(repo), "--models", "orient", "--run-time", "3",
              "--users", "2", "--clean", str(foreign / "clean"), "--triggered", str(foreign / "triggered"),
              "--target", "1", "--out", str(tmp_path / "load")])  # fmt: skip
        report = capsys.readouterr().out
        print(report)
        assert "| orient |" in report


@pytest.mark.integration
def test_observe_mode_loads_and_records_on_a_model_with_dynamic_dims(foreign, tmp_path):
    from clients import FireClient
    from fire_backend.traffic import TrafficStats
    from fire_cli.main import main

    repo = tmp_path / "repo"
    main(["protect", "--onnx", str(foreign / "model.onnx"), *PREPROCESS, "--clean", str(foreign / "clean"),
          "--observe", "--model", "orient", "--out", str(repo), "--work-dir", str(tmp_path / "w")])  # fmt: skip
    images, _ = pairs("test")
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        FireClient(server.grpc_url).infer("orient", to_input(images[:16]).numpy())
    stats, _ = TrafficStats.load(repo / "orient_tail" / "traffic.safetensors")
    assert stats.total == 16 and stats.num_classes == 2


@pytest.mark.integration
def test_a_source_repository_is_served_whole_on_the_cpu_profile(foreign, tmp_path, capsys):
    """An onnxruntime_onnx entry (and another onnxruntime model beside it) protected from its Triton
    repository: no --input-size (the config declares the dims), and the CPU server loads everything."""
    import shutil

    from fire_cli.main import main

    src = tmp_path / "src"
    for name in ("orientation", "other"):
        (src / name / "1").mkdir(parents=True)
        shutil.copyfile(foreign / "model.onnx", src / name / "1" / "model.onnx")
        (src / name / "config.pbtxt").write_text(f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 16
input {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [3, 32, 64] }}
output {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [2] }}
""")
    out = tmp_path / "protected"
    main(["protect", "--source-repo", str(src), "--source-model", "orientation", "--channels", "BGR", "--mean", "0.5",
          "0.5", "0.5", "--std", "0.5", "0.5", "0.5", "--clean", str(foreign / "clean"), "--poisoned",
          str(foreign / "flagged"), "--cut", "/features/features.2/features.2.2/Relu_output_0", "--out", str(out),
          "--work-dir", str(tmp_path / "w")])  # fmt: skip
    assert "not servable" not in capsys.readouterr().out
    with TritonServer(ServerConfig(out, http_port=0, grpc_port=0, metrics_port=0)) as server:
        states = server.model_states()
        assert {"orientation", "orientation_unprotected", "other"} <= set(states)
        assert all(m["state"] == "READY" for m in states.values()), json.dumps(states)


def test_fire_serve_says_when_its_port_is_taken(tmp_path, capsys):
    (http,) = free_ports(1)
    holder = socket.socket()
    holder.bind(("127.0.0.1", http))
    holder.listen()
    try:
        (tmp_path / "repo").mkdir()
        err = fire_fails(["serve", "--repo", str(tmp_path / "repo"), "--http-port", str(http)], capsys)
        assert f"HTTP port 127.0.0.1:{http} is in use" in err
    finally:
        holder.close()
