import numpy as np
import pytest
import torch

from calibration import CalibrationConfig, HeadFeatures, RunningMean, calibrate
from fire_backend.directions import DirectionFile
from fire_backend.names import FEATURES, LOGITS
from fire_backend.onnx_runtime import onnx_session
from fire_backend.repair import Repair

from .conftest import triggered_subset


def test_running_mean_matches_numpy():
    x = np.random.default_rng(0).normal(5, 3, size=(1000, 4, 2)).astype(np.float32)
    acc = RunningMean()
    for i in range(0, 1000, 37):
        acc.update(x[i : i + 37])
    assert acc.count == 1000
    np.testing.assert_allclose(acc.value(), x.astype(np.float64).mean(0), atol=1e-5)


def _predict(a, images, repair: Repair | None) -> np.ndarray:
    feats = HeadFeatures(a.export_dir)(images)
    if repair is not None:
        feats = repair(torch.from_numpy(feats)).numpy()
    return onnx_session(a.export_dir / "tail.onnx").run([LOGITS], {FEATURES: feats})[0].argmax(1)


def test_direction_file_records_its_provenance(artifacts):
    a = artifacts["cifar10"]
    d = DirectionFile.load(a.directions)
    assert d.head_sha256 == a.info.head_sha256 and d.layer == "layer2"
    assert list(d.feature_shape) == a.info.feature_shape
    assert d.n_poisoned == 100 and d.extra["attack"]["name"] == "badnets"


@pytest.mark.parametrize("name", ["cifar10", "gtsrb"])
def test_paired_directions_remove_the_backdoor_locally(artifacts, name):
    a = artifacts[name]
    triggered, labels = triggered_subset(a)
    plain = _predict(a, triggered, None)
    repaired = _predict(a, triggered, Repair(DirectionFile.load(a.directions)))
    asr_plain, asr_fire = (plain == a.attack.target).mean(), (repaired == a.attack.target).mean()
    assert asr_plain > 0.8, f"the committed model should carry its backdoor (ASR {asr_plain:.2f})"
    assert asr_fire < 0.15 and (repaired == labels).mean() > (plain == labels).mean() + 0.4
    clean_plain = (_predict(a, a.test.images, None) == a.test.labels).mean()
    clean_fire = (_predict(a, a.test.images, Repair(DirectionFile.load(a.directions))) == a.test.labels).mean()
    assert clean_fire >= clean_plain - 0.05


def test_unpaired_estimate_also_lowers_asr(artifacts, tmp_path):
    a = artifacts["cifar10"]
    d = calibrate(
        a.export_dir,
        tmp_path / "u.safetensors",
        CalibrationConfig(estimator="unpaired", n_poisoned=100, n_clean=300, views=2),
    )
    assert d.estimator == "unpaired"
    triggered, _ = triggered_subset(a)
    plain = (_predict(a, triggered, None) == a.attack.target).mean()
    fire = (_predict(a, triggered, Repair(d)) == a.attack.target).mean()
    assert fire < plain / 2


def test_gated_threshold_holds_its_false_positive_rate_on_clean_data(artifacts):
    a = artifacts["cifar10"]
    d = DirectionFile.load(a.directions)
    scores = Repair(d).scores(torch.from_numpy(HeadFeatures(a.export_dir)(a.test.images))).numpy()
    assert (scores > d.threshold).mean() < 0.05  # calibrated at 1 % on training images; a test subset
    trig_scores = Repair(d).scores(torch.from_numpy(HeadFeatures(a.export_dir)(triggered_subset(a)[0]))).numpy()
    assert (trig_scores > d.threshold).mean() > 0.9
