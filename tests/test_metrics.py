"""FIRE's Prometheus metrics, scraped from a real tritonserver's metrics endpoint."""

from __future__ import annotations

import re
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from clients import FireClient
from fire_backend.directions import DirectionFile
from zoo.data import to_tensor_batch

from .conftest import triggered_subset


def scrape(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(fire_\w+)\{(.*)\} (\S+)$", line)
        if m:
            out[f"{m[1]}{{{m[2]}}}"] = float(m[3])
    return out


def value(metrics: dict[str, float], name: str, model: str, extra: str = "") -> float:
    hits = [v for k, v in metrics.items() if k.startswith(name + "{") and f'model="{model}"' in k and extra in k]
    assert len(hits) == 1, (name, model, extra, sorted(metrics))
    return hits[0]


def poll(condition, timeout: float = 20.0, every: float = 0.2):
    """The first non-falsy value of ``condition()``, polling until ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


def _settled(server) -> dict[str, float]:
    """A scrape after earlier traffic has been flushed: two scrapes a flush interval apart agree."""

    def stable():
        first = scrape(server)
        time.sleep(1.2)  # the stub flushes once a second: an unchanged second scrape means nothing is pending
        return first if scrape(server) == first else None

    return poll(stable, timeout=30)


def test_repair_metrics_count_samples_scores_and_rejections(server, artifacts):
    a = artifacts["cifar10"]
    c = FireClient(server.grpc_url, "grpc")
    before = _settled(server)
    clean = to_tensor_batch(a.test.images[:30])
    triggered = to_tensor_batch(triggered_subset(a, 20)[0])
    c.infer("cifar10", clean)
    c.infer("cifar10", triggered)
    # NaN features sent straight to the repair model: refused, and counted
    feats = np.full((2, *a.info.feature_shape), np.nan, dtype=np.float32)
    inp = grpcclient.InferInput("FEATURES", list(feats.shape), "FP32")
    inp.set_data_from_numpy(feats)
    with pytest.raises(InferenceServerException, match="NaN"):
        grpcclient.InferenceServerClient(server.grpc_url).infer("cifar10_fire", [inp], headers=server.headers("grpc"))

    def delta(name: str, extra: str = "", metrics: dict | None = None) -> float:
        old = [v for k, v in before.items() if k.startswith(name + "{") and 'model="cifar10_fire"' in k and extra in k]
        return value(metrics or after, name, "cifar10_fire", extra) - (old[0] if old else 0.0)

    def flushed():  # the stub publishes its counts once a second: wait for these 50 samples and 1 refusal
        m = scrape(server)
        done = delta("fire_repair_samples_total", metrics=m) == 50
        return m if done and delta("fire_repair_rejected_requests_total", metrics=m) == 1 else None

    after = {}
    after = poll(flushed)

    assert delta("fire_repair_samples_total") == 50
    # project mode moves triggered samples (score > 0) and some clean ones a little; every sample when
    # calibration turned the file's gate off (a trigger's views or a dimmed trigger would pass under it)
    changed = delta("fire_repair_changed_samples_total")
    if DirectionFile.load(a.directions).project_gate:
        assert 20 <= changed < 50
    else:
        assert changed == 50
    assert delta("fire_projection_score_count") == 50
    assert delta("fire_projection_score_bucket", 'le="+Inf"') == 50
    # triggered samples score near |beta| (ratio ~1), clean ones near 0: >= 18 of 20 above 0.5
    above_half = delta("fire_projection_score_count") - delta("fire_projection_score_bucket", 'le="0.5"')
    assert 18 <= above_half <= 25
    assert delta("fire_repair_rejected_requests_total") == 1
    assert value(after, "fire_direction_version", "cifar10_fire") == 1
    assert value(after, "fire_direction_updates", "cifar10_fire") == 0
    assert value(after, "fire_direction_created_timestamp_seconds", "cifar10_fire") > 1.7e9
    # metrics are per repair model: the gtsrb one saw none of this traffic
    gtsrb_before = [v for k, v in before.items() if k.startswith("fire_repair_samples_total{") and "gtsrb_fire" in k]
    assert value(after, "fire_repair_samples_total", "gtsrb_fire") == (gtsrb_before[0] if gtsrb_before else 0.0)
