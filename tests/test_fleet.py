"""The loopback fleet (benchmarks/fleet.py): the Deployment's shape with real tritonservers, their own
repository copies and gateways, and a real HAProxy in front. A direction file rolled out pod by pod
and a pod killed with SIGKILL, both under load through the front: no request fails, none is answered
unprotected or by a mix of files; a file one pod refuses leaves every pod on its old file."""

from __future__ import annotations

import shutil

import pytest

from benchmarks.fleet import FleetBenchConfig, run_fleet, write_fleet

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="no haproxy (scripts/test.sh installs it)"),
]


def test_rollout_and_a_killed_pod_under_load_fail_nothing_and_a_refused_file_stops_the_rollout(tmp_path):
    cfg = FleetBenchConfig(replicas=2, scaling=(), rate=15.0, duration_s=6.0, work_dir=tmp_path / "fleet",
                           out=tmp_path / "fleet.md")  # fmt: skip
    r = run_fleet(cfg)
    for v in (r.rollout, r.kill):
        assert v.total >= 0.8 * cfg.rate * cfg.duration_s and v.failed == 0, v.first_errors
        assert v.unprotected == 0 and v.mixed == 0
    assert r.rollout.old > 0 and r.rollout.new > 0  # the load saw the switch
    assert r.kill.old == r.kill.total  # after the rollout every answer is the rolled-out file's
    assert "pod 1 refused" in r.refusal and "1 pod(s) put their previous file back" in r.refusal
    assert r.refused_pods_on_old == [True, True]
    text = write_fleet(cfg, r, 0.0).read_text()
    assert "| rollout, pod by pod |" in text and "SIGKILL" in text
