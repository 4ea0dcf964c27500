"""deploy/: Kubernetes manifests validated against the Kubernetes 1.31 schemas (kubernetes-validate,
strict: unknown fields are errors), the Dockerfile parsed, and its entrypoint run with the real
tritonserver binary. Neither Docker nor Kubernetes runs here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from fire_backend.names import ADMIN_HEADER
from serving.repository import build_engines
from serving.server import free_port, prepare_backends, pytriton_root

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def manifests() -> dict[str, dict]:
    out = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def test_manifests_validate_against_the_kubernetes_schema():
    docs = manifests()
    assert {"Deployment/fire-triton", "Service/fire-triton", "HorizontalPodAutoscaler/fire-triton"} <= set(docs)
    for doc in docs.values():
        kubernetes_validate.validate(doc, "1.31.0", strict=True)  # raises on any schema error
    bad = dict(docs["Service/fire-triton"], spec={"ports": [{"port": "eighty"}]})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.31.0", strict=True)  # the checker does catch mistakes


def test_deployment_probes_gpu_ports_and_autoscaling_fit_together():
    docs = manifests()
    dep = docs["Deployment/fire-triton"]
    pod = dep["spec"]["template"]["spec"]
    triton = next(c for c in pod["containers"] if c["name"] == "triton")
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {p["containerPort"] for p in triton["ports"]} == {8000, 8001, 8002}
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert {v["name"] for v in pod["volumes"]} >= {m["name"] for m in triton["volumeMounts"]}
    svc = docs["Service/fire-triton"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {p["name"] for p in triton["ports"]}
    hpa = docs["HorizontalPodAutoscaler/fire-triton"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(docs["ConfigMap/fire-prometheus-adapter-rules"]["data"]["config.yaml"])
    assert metric in {r["name"]["as"] for r in rules["rules"]}
    secret = triton["env"][0]["valueFrom"]["secretKeyRef"]
    assert secret["name"] == docs["Secret/fire-admin"]["metadata"]["name"]


def test_dockerfile_uses_triton_24_10_and_the_entrypoint():
    df = DockerfileParser(path=str(DEPLOY / "Dockerfile"))
    assert df.baseimage == "nvcr.io/nvidia/tritonserver:24.10-py3"  # Triton server 2.51, as tested here
    instructions = [i["instruction"] for i in df.structure]
    assert "ENTRYPOINT" in instructions and "USER" in instructions
    for copied in (i["value"].split()[0] for i in df.structure if i["instruction"] == "COPY"):
        assert (DEPLOY.parent / copied).exists(), copied


def test_entrypoint_starts_the_real_tritonserver_with_restricted_model_control(repository, tmp_path):
    """The container's entrypoint with the binary from nvidia-pytriton, CPU profile, loopback only."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tritonserver").symlink_to(pytriton_root() / "bin" / "tritonserver")
    env = dict(os.environ, FIRE_ADMIN_KEY="k3y", FIRE_MODEL_REPOSITORY=str(repository), FIRE_PROFILE="cpu")
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env["PATH"]])
    env["LD_LIBRARY_PATH"] = str(pytriton_root().parent.parent / "nvidia_pytriton.libs")
    env["PYTHONPATH"] = str(DEPLOY.parent)
    http, grpc, metrics = free_port(), free_port(), free_port()
    args = [f"--{k}-address=127.0.0.1" for k in ("http", "grpc", "metrics")]
    args += [f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]
    args += [f"--backend-directory={prepare_backends(tmp_path / 'backends')}"]
    env["FIRE_LOAD_MODELS"] = "cifar10_plain,cifar10_gated"
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(DEPLOY / "entrypoint.sh"), *args], env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/cifar10_plain/ready").status == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        else:
            pytest.fail("the entrypoint's server did not get cifar10_plain ready:\n" + log.read_text()[-3000:])
        unload = f"http://127.0.0.1:{http}/v2/repository/models/cifar10_plain/unload"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(unload, method="POST", data=b"{}"))
        assert e.value.code == 403
        req = urllib.request.Request(unload, method="POST", data=b"{}", headers={ADMIN_HEADER: "k3y"})
        assert urllib.request.urlopen(req).status == 200
        assert urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/cifar10_gated/ready").status == 200
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    env.pop("FIRE_ADMIN_KEY")
    r = subprocess.run([str(DEPLOY / "entrypoint.sh")], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "FIRE_ADMIN_KEY" in r.stderr  # no key, no server


def test_build_engines_explains_itself_without_a_gpu(repository):
    from modelio.tensorrt import TensorRTUnavailableError

    with pytest.raises(TensorRTUnavailableError, match="GPU"):
        build_engines(repository)
