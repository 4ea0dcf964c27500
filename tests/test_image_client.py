"""A stock Triton client against the demo's protected model, through the gateway.

The demo serves raw pixels (uint8, NHWC, format declared in the config) with a label file, which is
what NVIDIA's example `image_client.py` (triton-inference-server/client, src/python/examples) produces
with its default scaling and reads back as `value:index:label`. That script is not shipped in any
package: give its path in `$FIRE_IMAGE_CLIENT` and it is run unmodified over HTTP and gRPC; without it
the same contract is checked with tritonclient the way the script uses it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibration import CalibrationConfig, calibrate
from fire_backend.names import DIRECTIONS_FILE, LABELS_FILE
from modelio.export import export_split
from serving.gateway import GatewayConfig, write_gateway
from serving.repository import ProtectedModel, build_repository
from serving.server import ServerConfig, TritonServer, free_ports
from zoo.data import CIFAR10_CLASSES, load_dataset

from .conftest import MODELS

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (scripts/test.sh does it)"),
]
IMAGE_CLIENT = os.environ.get("FIRE_IMAGE_CLIENT")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's protected model (raw pixels, labels) behind the real gateway."""
    d = tmp_path_factory.mktemp("demo")
    export = d / "export"
    export_split(MODELS["cifar10"], "layer2", export, n_check=32, pixels="uint8")
    calibrate(export, export / DIRECTIONS_FILE, CalibrationConfig(n_poisoned=50, n_clean=200))
    repo = d / "repo"
    build_repository([ProtectedModel("cifar10", export, export / DIRECTIONS_FILE)], repo)
    test = load_dataset("cifar10", "test").subset(64, seed=3)
    images = d / "images"
    images.mkdir()
    for i, img in enumerate(test.images[:8]):
        Image.fromarray(img).save(images / f"{i}_{CIFAR10_CLASSES[test.labels[i]]}.png")
    with TritonServer(ServerConfig(repo, http_port=0, grpc_port=0, metrics_port=0)) as server:
        http, grpc = free_ports(2)
        cfg = GatewayConfig(triton_http=server.http_url, triton_grpc=server.grpc_url, listen_http=f"127.0.0.1:{http}",
                            listen_grpc=f"127.0.0.1:{grpc}")  # fmt: skip
        path = write_gateway(repo, d / "gw" / "haproxy.cfg", cfg)
        proc = subprocess.Popen(["haproxy", "-f", str(path), "-db"], stdout=subprocess.DEVNULL)
        time.sleep(1.0)
        yield cfg, repo, images, server
        proc.terminate()
        proc.wait(10)


def test_the_served_contract_is_what_a_stock_image_client_expects(demo):
    """What image_client.py's parse_model requires, read through the gateway, and a classification
    request answered as value:index:label."""
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.model_config_pb2 as mc

    cfg, repo, images, _ = demo
    c = grpcclient.InferenceServerClient(cfg.listen_grpc)
    meta, config = c.get_model_metadata("cifar10"), c.get_model_config("cifar10").config
    assert len(meta.inputs) == len(meta.outputs) == len(config.input) == 1
    assert meta.outputs[0].datatype == "FP32" and meta.inputs[0].datatype == "UINT8"
    assert config.input[0].format == mc.ModelInput.FORMAT_NHWC and list(meta.inputs[0].shape) == [-1, 32, 32, 3]
    assert config.output[0].label_filename == LABELS_FILE and (repo / "cifar10" / LABELS_FILE).is_file()
    image = np.stack([np.array(Image.open(sorted(images.iterdir())[0]).convert("RGB"))])
    inp = grpcclient.InferInput(meta.inputs[0].name, list(image.shape), "UINT8")
    inp.set_data_from_numpy(image)
    out = grpcclient.InferRequestedOutput(meta.outputs[0].name, class_count=3)
    top = c.infer("cifar10", [inp], outputs=[out], request_id="1").as_numpy(meta.outputs[0].name)[0]
    value, index, label = top[0].decode().split(":")
    assert float(value) and label == CIFAR10_CLASSES[int(index)]


NO_CLIENT = "set $FIRE_IMAGE_CLIENT to NVIDIA's image_client.py (client repo, src/python/examples)"


@pytest.mark.skipif(not (IMAGE_CLIENT and Path(IMAGE_CLIENT).is_file()), reason=NO_CLIENT)
@pytest.mark.parametrize("protocol", ["HTTP", "gRPC"])
def test_nvidias_image_client_runs_unmodified_through_the_gateway(demo, protocol):
    cfg, _, images, _ = demo
    url = cfg.listen_http if protocol == "HTTP" else cfg.listen_grpc
    done = subprocess.run([sys.executable, IMAGE_CLIENT, "-m", "cifar10", "-u", url, "-i", protocol, "-c", "3",
                           "-b", "4", str(images)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.rstrip().endswith("PASS")
    answers = [line.strip() for line in done.stdout.splitlines() if line.startswith("    ") and " = " in line]
    labels = [line.split(" = ", 1)[1] for line in answers]  # "value (index) = label", top 3 per image
    assert len(labels) == 8 * 3 and set(labels) <= set(CIFAR10_CLASSES), done.stdout[-1500:]
    top1 = labels[::3]
    truth = [p.stem.split("_", 1)[1] for p in sorted(images.iterdir())]
    assert sum(a == b for a, b in zip(top1, truth, strict=False)) >= 5  # the clean images mostly right
