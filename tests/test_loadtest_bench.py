"""The operator tools run for real, briefly: locust over both protocols against the session server, and
the serving benchmark in its quick form (their numbers are not asserted: those live in results/)."""

import csv
import json

import pytest

from benchmarks.serving import ServingBenchConfig
from benchmarks.serving import main as bench_main
from fire_backend.network import is_loopback
from loadtest.runner import LoadTestConfig, run_loadtest


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_headless_locust_reports_throughput_failures_and_live_asr(server, tmp_path, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    cfg = LoadTestConfig(
        models=["cifar10", "cifar10_plain"],
        protocol=protocol,
        url=url,
        repository=server.config.repository,  # the dataset, attack and preprocessing its models record
        users=2,
        run_time_s=4,
        batch_size=4,
        out_dir=tmp_path,
    )
    summary = run_loadtest(cfg)
    rows = json.loads((tmp_path / f"{protocol}_summary.json").read_text())
    for model in ("cifar10", "cifar10_plain"):
        r = rows[model]
        assert r["requests"] > 10 and r["failures"] == 0 and r["p50_ms"] > 0
        assert r["triggered_images"] > 0 and r["clean_images"] > 0
        assert (tmp_path / f"{protocol}_{model}_stats_history.csv").stat().st_size > 0
    assert rows["cifar10"]["live_asr"] < 0.2 < 0.7 < rows["cifar10_plain"]["live_asr"]
    assert "| cifar10 |" in summary.read_text()
    assert (tmp_path / f"{protocol}_latency.png").stat().st_size > 10_000


def test_loadtests_refuse_non_loopback_targets(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and not is_loopback("192.0.2.1")
    with pytest.raises(ValueError, match="not a loopback"):
        run_loadtest(LoadTestConfig(url="192.0.2.1:8001", out_dir=tmp_path))


@pytest.mark.integration
def test_serving_benchmark_quick_run_writes_its_tables(tmp_path):
    cfg = ServingBenchConfig(
        batch_sizes=(4,),
        concurrency=(2,),
        window_s=0.3,
        window_requests=10,  # count windows, as the 224x224 run measures
        rounds=1,
        stability=60,
        instance_counts=(2,),  # one more server: 2 instances per step
        scaling_cells=((4, 2),),
        scaled=("folded",),  # the scaling table's path once (each model there is one more perf_analyzer run)
        work_dir=tmp_path / "work",
        out_dir=tmp_path / "out",
        name="quick",
    )
    md = bench_main(cfg)
    with (tmp_path / "out" / "quick.csv").open() as f:
        rows = list(csv.DictReader(f))
    models = {"whole", "plain", "fire_project", "fire_subtract", "fire_gated", "fused", "folded"}
    main_rows = [r for r in rows if r["instances"] == "1"]
    assert {r["model"] for r in rows} == models and len(rows) == len(models) + 1
    assert all(float(r["images_per_s"]) > 0 and float(r["p99_ms"]) >= float(r["p50_ms"]) for r in rows)
    assert all(float(r["server_compute_us"]) > 0 for r in main_rows)  # perf_analyzer reached the statistics
    fire = [r for r in rows if r["model"].startswith("fire")]
    assert all(float(r["repair_infer_us_per_exec"]) > 0 and "fire" in r["steps_queue_compute_us"] for r in fire)
    assert {r["instances"] for r in rows if r["model"] == "folded"} == {"1", "2"} and len(main_rows) == len(models)
    text = md.read_text()
    assert "perf_analyzer 2.41.0" in text and "FIRE/plain" in text and "## Targets" in text and "Repair core" in text
    assert "## The zero-hop graphs, in process" in text and "| folded | " in text and "| folded, rank 1 | " in text
    zero_hop = {line.split(" | ")[0][2:]: float(line.split(" | ")[1]) for line in text.splitlines()
                if line.startswith(("| whole", "| fused", "| folded"))}  # fmt: skip
    assert zero_hop["whole + the two products"] > zero_hop["whole"]  # the repair's arithmetic is timed
    cold = {line.split(" | ")[0][2:]: float(line.split(" | ")[-2]) for line in text.splitlines()
            if line.startswith(("| whole", "| fused", "| folded"))}  # fmt: skip
    assert cold["whole"] > zero_hop["whole"]  # the cold column is there, a median at least the warm best
    assert (tmp_path / "out" / "quick.png").stat().st_size > 10_000


def test_short_soak_keeps_errors_memory_and_shm_in_bounds(server, tmp_path):
    """CI's one-minute version of `fire soak` (the 10-minute run's report is results/soak.md)."""
    from loadtest.soak import SoakConfig, run_soak

    cfg = SoakConfig(duration_s=35, warmup_s=10, rate_per_s=20, sample_every_s=2, out=tmp_path / "soak.md")
    r = run_soak(cfg, server=server)
    assert sum(r.requests.values()) > 0.8 * cfg.rate_per_s * cfg.duration_s
    assert r.errors == {"grpc": 0, "http": 0}, r.first_errors
    assert r.shm_stable and r.rss_growth < cfg.max_rss_growth, (r.rss_growth, r.samples[-3:])
    assert r.passed and "PASS" in (tmp_path / "soak.md").read_text()
    assert r.triggered_to_target < 0.2 * r.triggered_images  # protected under load, too
