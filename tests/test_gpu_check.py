"""The GPU check's dry run (``bash scripts/gpu_check.sh --cpu``): the bundle a GPU machine gets is built,
fits what one device call carries, and unpacks into a server that passes every check on this machine's
CPU, for the CPU profile and for the gpu_torch profile on CPU instances."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from benchmarks.gpu_check import CARRY_LIMIT
from fire_backend.names import PROJECT_ROOT


@pytest.mark.integration
def test_the_gpu_check_dry_run_passes_and_its_bundle_fits_one_device_call(tmp_path):
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path)}
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu"], cwd=PROJECT_ROOT, env=env, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["profile"] for r in data["reports"]] == ["cpu", "gpu_torch_cpu"]
    for report in data["reports"]:
        assert len(report["checks"]) == 7 and all(c["passed"] for c in report["checks"]), report["checks"]
        assert {row["model"] for row in report["latency"]} == {"cifar10", "cifar10_plain", "cifar10_whole"}
    carried = data["carried"]
    assert carried["total"] == carried["working_tree"] + carried["carried"] <= CARRY_LIMIT  # what the device gets
    assert (PROJECT_ROOT / "build" / "gpu_check" / "bundle.tar.xz").stat().st_size == carried["bundle"]
