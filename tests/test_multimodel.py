"""One real tritonserver hosting three protected models (two datasets, two architectures) with their
plain twins: unload / load / hot-update one while the other two serve, zero failed or changed answers."""

from __future__ import annotations

import pytest

from benchmarks.multimodel import MultiModelConfig, run_multimodel


@pytest.mark.integration
def test_three_protected_models_one_changes_the_others_keep_serving(tmp_path):
    cfg = MultiModelConfig(workdir=str(tmp_path / "work"), out=str(tmp_path / "multimodel.md"), load_seconds=2.0)
    r = run_multimodel(cfg)
    assert r.passed, r.failures[:5]
    assert min(r.requests.values()) > 20  # both other models answered throughout
    last = r.memory[-1]
    assert len(last["stubs"]) == 9  # head, repair, tail for each of the three
    assert all(v > 20 for v in last["stubs"].values()) and sum(last["stubs_pss"].values()) > 0  # live interpreters
    for e in r.events[:3]:  # the other models kept answering during every change
        assert all(n > 0 for n in e["answers_meanwhile"].values()), e
    text = (tmp_path / "multimodel.md").read_text()
    assert "**PASS**" in text and "gtsrb" in text and "cifar10_vgg" in text
