"""deploy/: Kubernetes manifests validated against the Kubernetes 1.31 schemas (kubernetes-validate,
strict: unknown fields are errors), the Dockerfile parsed, and its entrypoint run with the real
tritonserver binary. Neither Docker nor Kubernetes runs here."""

from __future__ import annotations

import os
import re
import shutil
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
from serving.server import free_ports

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
    gateway = next(c for c in pod["containers"] if c["name"] == "gateway")
    assert "ports" not in triton  # Triton listens on 127.0.0.1 inside the pod: only the gateway is reachable
    assert triton["command"] == ["/opt/fire/entrypoint.sh"] and gateway["command"] == ["/opt/fire/gateway.sh"]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # Triton is probed inside its own container on the port the entrypoint gives it, not through the
    # gateway (a gateway crash must not restart Triton); the gateway has a liveness probe of its own
    http_port = re.search(r"--http-port (\d+)", (DEPLOY / "entrypoint.sh").read_text()).group(1)
    for probe in ("startupProbe", "livenessProbe"):
        command = " ".join(triton[probe]["exec"]["command"])
        assert f"http://127.0.0.1:{http_port}/v2/health/live" in command, command
    assert gateway["livenessProbe"]["tcpSocket"]["port"] == "http"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {p["containerPort"] for p in gateway["ports"]} == {9000, 9001, 9002}
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert {v["name"] for v in pod["volumes"]} >= {m["name"] for m in triton["volumeMounts"]}
    svc = docs["Service/fire-triton"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {p["name"] for p in gateway["ports"]}
    hpa = docs["HorizontalPodAutoscaler/fire-triton"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(docs["ConfigMap/fire-prometheus-adapter-rules"]["data"]["config.yaml"])
    assert metric in {r["name"]["as"] for r in rules["rules"]}
    secret = triton["env"][0]["valueFrom"]["secretKeyRef"]
    assert secret["name"] == docs["Secret/fire-admin"]["metadata"]["name"]


def test_only_the_promotion_job_writes_the_shared_source():
    """Pods mount the shared source read-only (a compromised pod cannot plant a file every new pod
    copies); the rollout's promotion Job is its only writer, holds no key and validates as a Job."""
    pod = manifests()["Deployment/fire-triton"]["spec"]["template"]["spec"]
    mounts = [m for c in pod["initContainers"] + pod["containers"] for m in c["volumeMounts"]]
    assert [m.get("readOnly") for m in mounts if m["name"] == "model-source"] == [True, True]
    assert next(v for v in pod["volumes"] if v["name"] == "model-source")["persistentVolumeClaim"]["readOnly"]
    assert pod["automountServiceAccountToken"] is False  # no API token in a pod to create a writer with
    text = (DEPLOY / "promote-job.yaml").read_text()
    job = yaml.safe_load(text.replace("@JOB@", "fire-promote-1").replace("@MODEL@", "m").replace("@FILE@", "/f"))
    kubernetes_validate.validate(job, "1.31.0", strict=True)
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert "env" not in container and "ports" not in container
    assert container["volumeMounts"] == [{"name": "model-source", "mountPath": "/models-src"}]
    claim = next(v for v in pod["volumes"] if v["name"] == "model-source")["persistentVolumeClaim"]["claimName"]
    assert spec["volumes"][0]["persistentVolumeClaim"] == {"claimName": claim}  # writable here only


def _rollout(tmp_path: Path, pods: list[str], refuses: str = "", later: str = "") -> tuple[int, list[str], Path]:
    """deploy/rollout_directions.sh against a stand-in ``kubectl`` (no cluster here) that answers the pod
    list (``later`` joins it after the promotion), fails ``fire reload`` on the pod ``refuses``, records
    every call and keeps the manifest it is given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "pods").write_text(" ".join(pods))
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(f"""#!/bin/bash
echo "$*" >> {tmp_path}/calls
case "$*" in
  *"get pods"*) cat {tmp_path}/pods ;;
  *"get job"*) echo "1/" ;;
  *"create -f -"*) cat > {tmp_path}/job.yaml; echo " {later}" >> {tmp_path}/pods ;;
  *"exec {refuses or "-"} "*"--directions"*) exit 1 ;;
esac
""")
    kubectl.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(DEPLOY / "rollout_directions.sh"), "cifar10", "/models-src/incoming/new.st"],
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    calls = (tmp_path / "calls").read_text().splitlines()
    return proc.returncode, calls, tmp_path / "job.yaml"


def test_rollout_goes_pod_by_pod_promotes_once_and_reaches_pods_started_meanwhile(tmp_path):
    rc, calls, job = _rollout(tmp_path, ["p1", "p2"], later="p3")
    assert rc == 0
    reloads = [c.split()[3] for c in calls if "--directions /models-src/incoming/new.st" in c and "exec" in c]
    assert reloads == ["p1", "p2", "p3"]  # one at a time; p3 copied the source before the promotion
    created = yaml.safe_load(job.read_text())
    kubernetes_validate.validate(created, "1.31.0", strict=True)
    command = created["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--model") + 1] == "cifar10"
    assert command[command.index("--directions") + 1] == "/models-src/incoming/new.st"


def test_a_refused_file_stops_the_rollout_and_is_undone_without_promotion(tmp_path):
    rc, calls, job = _rollout(tmp_path, ["p1", "p2", "p3"], refuses="p2")
    assert rc == 1 and not job.exists()  # nothing promoted: new pods copy the old file
    execs = [(c.split()[3], "--previous" in c) for c in calls if c.startswith("-n default exec")]
    assert execs == [("p1", False), ("p2", False), ("p1", True)]  # p3 never touched; p1 put back


def test_no_running_pod_stops_the_rollout_before_anything_is_promoted(tmp_path):
    rc, calls, job = _rollout(tmp_path, [])
    assert rc == 1 and not job.exists() and not any("exec" in c for c in calls)


@pytest.mark.parametrize("args", [["m|x", "/models-src/f"], ["m", "/etc/passwd"], ["m", "/models-src/../x"],
                                  ["m", "/models-src/f", "Not_A_Namespace"]])  # fmt: skip
def test_the_rollout_refuses_names_that_would_edit_its_manifest(args):
    proc = subprocess.run(["bash", str(DEPLOY / "rollout_directions.sh"), *args], capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert proc.returncode == 2 and "refusing" in proc.stderr


def test_dockerfile_uses_triton_24_10_and_the_entrypoint():
    df = DockerfileParser(path=str(DEPLOY / "Dockerfile"))
    assert df.baseimage == "nvcr.io/nvidia/tritonserver:24.10-py3"  # Triton server 2.51, as tested here
    instructions = [i["instruction"] for i in df.structure]
    assert "ENTRYPOINT" in instructions and "USER" in instructions
    for copied in (i["value"].split()[0] for i in df.structure if i["instruction"] == "COPY"):
        assert (DEPLOY.parent / copied).exists(), copied


def test_entrypoint_runs_fire_serve_with_the_key_out_of_sight(repository, tmp_path):
    """The container's entrypoint (CPU profile here, the wheel's server, loopback): `fire serve` under its
    supervisor; the key from the environment is in no command line; no model control; no key, no server."""
    env = dict(os.environ, FIRE_ADMIN_KEY="k3y-from-a-secret", FIRE_MODEL_REPOSITORY=str(repository),
               FIRE_INFERENCE_KEY="inference-k3y-from-a-secret")  # fmt: skip
    env["FIRE_PROFILE"] = "cpu"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env["FIRE_CACHE_DIR"] = str(tmp_path / "cache")
    http, grpc, metrics = free_ports(3)
    args = [f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]
    log = tmp_path / "entrypoint.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(DEPLOY / "entrypoint.sh"), *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready").status == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        else:
            pytest.fail("the entrypoint's server did not get ready:\n" + log.read_text()[-3000:])
        from serving.procfs import descendants

        for pid in descendants(proc.pid):
            assert b"k3y-from-a-secret" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        index = f"http://127.0.0.1:{http}/v2/repository/index"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(index, method="POST", data=b"{}"))
        assert e.value.code == 403
        req = urllib.request.Request(index, method="POST", data=b"{}", headers={ADMIN_HEADER: "k3y-from-a-secret"})
        assert urllib.request.urlopen(req).status == 200
        unload = f"http://127.0.0.1:{http}/v2/repository/models/cifar10/unload"
        with pytest.raises(urllib.error.HTTPError):  # even with the key: no model control
            urllib.request.urlopen(urllib.request.Request(unload, method="POST", data=b"{}",
                                                          headers={ADMIN_HEADER: "k3y-from-a-secret"}))  # fmt: skip
        assert urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/cifar10/ready").status == 200
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
    env.pop("FIRE_ADMIN_KEY")
    r = subprocess.run([str(DEPLOY / "entrypoint.sh")], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "FIRE_ADMIN_KEY" in r.stderr  # no key, no server


def _requirements() -> dict[str, str]:
    """Distribution name -> requirement line, from the container's requirements file."""
    out = {}
    for line in (DEPLOY / "requirements-gpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name = re.split(r"[\[<>=!~ ]", line, maxsplit=1)[0].lower().replace("_", "-")
            out[name] = line
    return out


# what the Triton 24.10 image provides besides the standard library (its Python stubs load numpy themselves)
IMAGE_MODULES = {"triton_python_backend_utils"}
# the commands the container runs: fire serve / gateway / reload (fire_cli.serve), fire build-engines, the stubs
ENTRY_POINTS = (
    "fire_cli.main",
    "fire_cli.serve",
    "serving.repository",
    "modelio.tensorrt",
    "fire_backend.triton.repair_model",
    "fire_backend.triton.onnx_model",
    "fire_backend.triton.guard_model",
)
OPTIONAL = {"torchvision", "timm"}  # only for `--torch torchvision:NAME` / `timm:NAME`, never in the container


def test_the_container_installs_what_its_entry_points_import():
    """Every third-party module the container's commands and the stubs import (fire serve, gateway,
    build-engines, reload; the Python models) comes from deploy/requirements-gpu.txt or the image."""
    import importlib.metadata as md

    from .test_layers import GRAPH, THIRD_PARTY

    seen, todo = set(), list(ENTRY_POINTS)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            # fire_cli.main only registers the other commands; their imports run when those commands run
            todo += [t for t in GRAPH[m] if m != "fire_cli.main" or t == "fire_cli.common"]
    used = set().union(*(THIRD_PARTY[m] for m in seen)) - set(sys.stdlib_module_names) - {"__future__"}
    used -= IMAGE_MODULES
    provided = md.packages_distributions()
    required = _requirements()
    missing = {}
    for module in sorted(used):
        dists = {d.lower().replace("_", "-") for d in provided.get(module, [module])}
        if not dists & set(required) and module not in OPTIONAL:
            missing[module] = sorted(dists)
    assert missing == {}, f"imported by the container but not installed there: {missing}"
    assert "tensorrt" in required  # the engine builder's, pinned to the server's version


def test_the_stubs_torch_matches_the_images_cuda():
    """torch from PyPI is a CUDA 13 build (driver >= 580); the 24.10 image is CUDA 12.6: the container
    pins a CUDA 12 build no newer than the image's CUDA."""
    torch_line = _requirements()["torch"]
    m = re.search(r"\+cu(\d+)(\d)\b", torch_line)
    assert m, f"torch must be pinned to a CUDA build: {torch_line}"
    cuda = (int(m.group(1)), int(m.group(2)))
    assert cuda[0] == 12 and cuda <= (12, 6), torch_line
    assert "download.pytorch.org/whl/cu12" in (DEPLOY / "requirements-gpu.txt").read_text()
    from modelio.tensorrt import check_tensorrt_version

    check_tensorrt_version(re.search(r"tensorrt==([\d.]+)", _requirements()["tensorrt"]).group(1))


def test_the_dockerfile_reuses_uid_1000_and_installs_the_serving_requirements():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "getent passwd 1000" in text and "useradd --uid 1000" in text  # created only where it is missing
    assert "pip install --no-cache-dir -r deploy/requirements-gpu.txt" in text
    assert "FIRE_TRITONSERVER=/opt/tritonserver/bin/tritonserver" in text


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine builds engines for real")
def test_build_engines_explains_itself_without_a_gpu(repository):
    from modelio.tensorrt import TensorRTUnavailableError

    with pytest.raises(TensorRTUnavailableError, match="GPU"):
        build_engines(repository)
