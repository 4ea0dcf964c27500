"""The runtime baselines (``benchmarks/defenses``), each held to a property its paper states, on the
bundled models and real CIFAR-10 images: the BadNets model learned a 3x3 corner patch, its clean twin
did not."""

from __future__ import annotations

import pytest

from benchmarks.defenses import Context, Februus, FinePruning, ScaleUp, Strip, auroc
from benchmarks.defenses.base import predict
from benchmarks.defenses.layers import last_feature_map
from calibration.calibrate import zoo_calibration_set
from fire_backend.names import PROJECT_ROOT
from zoo.attacks import attack_from_spec
from zoo.checkpoint import load_model
from zoo.data import load_dataset


@pytest.fixture(scope="module")
def case():
    models = {n: load_model(PROJECT_ROOT / "models" / n) for n in ("cifar10_resnet_badnets", "cifar10_resnet_clean")}
    meta = models["cifar10_resnet_badnets"][1]
    attack = attack_from_spec(meta["attack"])
    calib = zoo_calibration_set("cifar10", attack, 50, 1000, 0)
    test = load_dataset("cifar10", "test").subset(300, seed=5)
    test_images = test.images[attack.counts_for_asr(test.labels)]
    return models, attack, calib, test_images


def _context(case, name: str) -> Context:
    models, _, calib, _ = case
    return Context(models[name][0], calib.clean, calib.clean_labels)


def test_strip_a_learned_trigger_keeps_superimpositions_confident(case):
    """Gao et al. 2019: a trojaned input's superimpositions keep the target class (low entropy), clean
    ones scatter; on a model without the backdoor the same patch does not stand out."""
    _, attack, _, images = case
    scores = {}
    for name in ("cifar10_resnet_badnets", "cifar10_resnet_clean"):
        strip = Strip()
        strip.fit(_context(case, name))
        scores[name] = auroc(strip(images).scores, strip(attack.apply(images)).scores)
    assert scores["cifar10_resnet_badnets"] > 0.85 and scores["cifar10_resnet_clean"] < 0.7, scores


def test_scale_up_a_learned_trigger_survives_amplification(case):
    """Guo et al. 2023: amplified triggered inputs keep their prediction (high SPC) more than clean ones."""
    _, attack, _, images = case
    scale_up = ScaleUp()
    scale_up.fit(_context(case, "cifar10_resnet_badnets"))
    clean, triggered = scale_up(images), scale_up(attack.apply(images))
    assert auroc(clean.scores, triggered.scores) > 0.8
    assert (clean.labels == -1).mean() < 0.05  # about the 1 % it is set to, on other images


def test_februus_grad_cam_points_at_the_trigger_and_removing_it_restores(case):
    """Doan et al. 2020: the explanation of a trojaned prediction lies on the trigger; inpainting it gives
    the input its own prediction back."""
    models, attack, _, images = case
    februus = Februus()
    februus.fit(_context(case, "cifar10_resnet_badnets"))
    triggered = attack.apply(images[:100])
    heat = februus.heat(triggered)
    mask = attack.trigger((32, 32)).mask[..., 0] > 0
    assert heat[:, mask].mean() > 2 * heat[:, ~mask].mean()
    model = models["cifar10_resnet_badnets"][0]
    before = (predict(model, triggered) == attack.target).mean()
    after = (februus(triggered).labels == attack.target).mean()
    assert before > 0.8 and after < 0.3


def test_fine_pruning_prunes_the_last_feature_map_whose_dormant_channels_carry_the_backdoor(case):
    """Liu et al. 2018: channels clean inputs leave dormant carry the backdoor: pruning them (no
    fine-tuning yet) costs the attack more than the clean accuracy. The pruned layer is the last
    stage's output, not the 1x1 shortcut projection that comes last in modules() order."""
    import torch

    models, attack, _, images = case
    model = models["cifar10_resnet_badnets"][0]
    assert last_feature_map(model, torch.zeros(2, 3, 32, 32)) is model.layer3
    pruned = FinePruning(prune=0.6, epochs=0)
    pruned.fit(_context(case, "cifar10_resnet_badnets"))
    labels = load_dataset("cifar10", "test").subset(300, seed=5).labels
    labels = labels[attack.counts_for_asr(labels)]
    ca = lambda m: (predict(m, images) == labels).mean()  # noqa: E731
    asr = lambda m: (predict(m, attack.apply(images)) == attack.target).mean()  # noqa: E731
    assert asr(model) - asr(pruned.model) > 2 * (ca(model) - ca(pruned.model)), (
        ca(model),
        ca(pruned.model),
        asr(model),
        asr(pruned.model),
    )


def test_detection_counts_only_successful_attacks_and_correct_clean_inputs():
    """A triggered input whose trigger failed is no attack to detect; a clean input the model gets wrong
    is not a clean answer to protect: neither enters TPR or AUROC."""
    import numpy as np

    from benchmarks.defenses import REJECTED, Outcome, detection

    clean = Outcome(np.array([1, 2, 3, 4]), np.array([0.1, 0.2, 0.3, 9.0]))  # the last one misclassified
    trig = Outcome(np.array([REJECTED, REJECTED, 5, 6]), np.array([5.0, 6.0, 0.0, 0.05]))  # two failed triggers
    tpr, area = detection(clean, np.array([True, True, True, False]), trig, np.array([True, True, False, False]))
    assert (tpr, area) == (100.0, 1.0)
    assert auroc(clean.scores, trig.scores) < 1.0  # counted over everything, the failures dilute both
    assert np.isnan(detection(clean, np.ones(4, bool), trig, np.zeros(4, bool))[0])
