import numpy as np
import pytest
import torch

from calibration import CalibrationConfig, HeadFeatures, RunningMean, calibrate
from fire_backend.directions import DirectionFile
from fire_backend.errors import InvalidInputError
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


def test_the_unpaired_reference_leaves_out_the_flagged_images_class():
    """Triggered images are other classes' images with the trigger on: the reference is the clean images
    the model does not put where the flagged ones go; all of them when too few would remain."""
    from calibration.estimators import unpaired_reference

    clean = np.array([0, 1, 1, 0, 1, 1, 1, 0, 1, 1])  # 70 % in class 1, the attacker's
    mask, target = unpaired_reference(clean, np.array([1, 1, 1, 0]))
    assert target == 1 and mask.tolist() == (clean != 1).tolist()
    mask, target = unpaired_reference(np.ones(20, int), np.ones(5, int))
    assert target is None and mask.all()


def test_a_two_class_shift_is_found_against_the_other_class_only():
    """On two classes with a large target class, the mean of every clean image mixes the classes: beta
    against it is pulled away from the trigger's shift; against the other class it is that shift."""
    from calibration.estimators import unpaired_reference

    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [4.0, 0.0]])  # class 0, class 1 (the target)
    labels = (rng.random(1000) < 0.7).astype(int)
    clean = centers[labels] + rng.normal(0, 0.3, (1000, 2))
    trigger = np.array([0.0, 3.0])
    flagged = centers[0] + trigger + rng.normal(0, 0.3, (50, 2))  # class-0 images with the trigger
    mask, _ = unpaired_reference(labels, np.ones(50, int))
    against_all = flagged.mean(0) - clean.mean(0)
    against_reference = flagged.mean(0) - clean[mask].mean(0)
    assert np.abs(against_reference - trigger).max() < 0.15
    assert np.abs(against_all - trigger).max() > 2  # the class make-up (0.7 x 4 along x) enters it


def test_without_labels_the_candidate_whose_moves_the_others_agree_on_wins():
    """Every candidate moves all flagged images off the target; only the ones that restore them agree."""
    from calibration.cutsearch import CutScore, _agreement

    true = np.arange(40) % 9 + 1  # held-out flagged images' true classes (unknown to the search), target 0
    rng = np.random.default_rng(1)

    def candidate(name, labels):
        return CutScore(name, (1,), 100.0, 0.0, "moved", "changed", 1.0, labels, np.zeros(40, int))

    restoring = [candidate(f"r{i}", np.where(rng.random(40) < 0.9, true, 5)) for i in range(3)]
    scattering = candidate("s", rng.integers(1, 10, 40))
    scores = _agreement([scattering, *restoring], [scattering, *restoring])
    assert max(scores, key=lambda s: s.gain).cut.startswith("r")
    assert scores[0].gain < 30 < 80 < min(s.gain for s in scores[1:])


def test_a_weak_repair_the_cost_bound_held_back_is_reported_with_the_stronger_ones_cost():
    """The foreign blend case: within the bound only strength 1 (64 % moved), strength 1.5 moves 96 % for
    1.2 points. Without labels, an image no admissible candidate moves gets its consensus from all of them,
    so the stronger candidate's gain is what it moves, while every admissible candidate's gain is as it was;
    ``shortfall`` names it and the bound that would let it through. A repair at 90 % or more, or no
    stronger candidate, is not reported."""
    from calibration.cutsearch import HELD_BACK_MAX_COST, CutScore, _agreement, shortfall

    before = np.ones(50, int)  # the attacker's class

    def candidate(alpha, moved, cost):
        return CutScore("c", (1,), 0.0, cost, "moved", "changed", alpha, np.where(np.arange(50) < moved, 0, 1), before)

    weak, strong = candidate(1.0, 32, 0.45), candidate(1.5, 48, 1.2)
    scores = _agreement([weak, strong, candidate(2.0, 50, 2.27)], [weak])
    assert [s.gain for s in scores] == [64.0, 96.0, 100.0]  # the cheapest past 90 % is named, not the most
    line = shortfall(scores[0], scores, 0.5)
    assert "64 %" in line and "alpha 1.5 moves 96 % for 1.20 points" in line and "--max-ca-drop 1.20" in line
    assert shortfall(scores[1], scores, 1.5) is None  # 96 % is no shortfall
    assert shortfall(scores[0], scores[:1], 0.5) is None  # nothing stronger to take
    slightly = _agreement([weak, candidate(1.5, 36, 0.7349)], [weak])  # 4 images more: within the noise of 50
    assert shortfall(slightly[0], slightly, 0.5) is None
    odd = _agreement([weak, candidate(1.5, 48, 0.7349)], [weak])  # the bound named admits it: rounded up
    assert "--max-ca-drop 0.74" in shortfall(odd[0], odd, 0.5)
    ruinous = _agreement([weak, candidate(1.5, 48, HELD_BACK_MAX_COST + 0.01)], [weak])  # tens of points: not offered
    assert shortfall(ruinous[0], ruinous, 0.5) is None


def test_the_gate_must_pass_every_view_at_full_and_at_half_its_shift():
    """``covers``: 90 % of every view's triggered projections past the clean mean, as they are and with the
    trigger at half its strength (paired: halfway from each original; unpaired: moved back by half the
    view's median shift); one view that fails either fails it; a few samples far past the gate do not."""
    from calibration.estimators import covers

    rng = np.random.default_rng(0)
    clean_spread = rng.normal(0.0, 1.0, 1000)  # along the gate's direction, mu at 0
    far, near = 10.0 + clean_spread, 2.0 + clean_spread  # shifts of 10 and of 2 clean standard deviations
    assert (near > 0).mean() > 0.9 and (near - 1.0 > 0).mean() < 0.9  # near passes at full shift, not at half
    assert covers([far, far + 1], 0.0)
    assert not covers([far, near], 0.0)
    assert not covers([far, -far], 0.0)  # a view whose shift points the other way (SIG's views)
    assert not covers([far, far[:0]], 0.0)  # a view with no samples
    outliers = np.concatenate([5.0 + clean_spread[:90], np.full(3, 100.0)])  # 3 % far past the gate
    assert covers([outliers], 0.0)  # the median shift: they raise no bar (the mean's would have: 8 > 2 x 2.5)
    # paired: each sample halfway from its own original; a trigger that moves half the images far and the
    # others little (a blend on dark and on bright images) passes as it is and fails dimmed
    originals = clean_spread[:400]
    uneven = originals + np.where(np.arange(400) % 2 == 0, 1.6, 10.0)
    assert (uneven > 0).mean() >= 0.9 and not covers([uneven], 0.0, [originals])
    assert covers([originals + 10.0], 0.0, [originals])


def test_the_cut_search_keeps_the_widest_views_its_cost_bound_allows():
    """Per (cut, strength): the zoom views where their cost is within the bound, whatever their gain; the
    views without zooms where only those are; the cheapest where neither is."""
    from calibration.cutsearch import CutScore, widest_affordable

    def score(cut, augment, cost, gain=50.0, alpha=1.0):
        return CutScore(cut, (1,), gain, cost, "PA", "CA drop", alpha, augment=augment)

    kept = widest_affordable([
        score("stem.2", "flips-shifts-zooms", 0.72, 70.0), score("stem.2", "flips-shifts", 0.48, 74.0),
        score("layer2.0", "flips-shifts-zooms", 0.2, 48.0), score("layer2.0", "flips-shifts", 0.1, 50.0),
        score("layer3", "flips-shifts-zooms", 0.9), score("layer3", "flips-shifts", 0.7),
        score("layer3", "flips-shifts-zooms", 0.3, alpha=1.5), score("layer3", "flips-shifts", 0.2, alpha=1.5),
    ], 0.5)  # fmt: skip
    assert [(s.cut, s.alpha, s.augment) for s in kept] == [
        ("stem.2", 1.0, "flips-shifts"), ("layer2.0", 1.0, "flips-shifts-zooms"),
        ("layer3", 1.0, "flips-shifts"), ("layer3", 1.5, "flips-shifts-zooms"),
    ]  # fmt: skip


def test_the_trigger_centre_is_found_from_pixels_paired_and_unpaired():
    """A corner patch's centre from pairs and from two unrelated sets (flagged and clean); a full-image
    blend's, near the image's centre; the image's centre from one flagged image or a constant border; and
    a zoom view magnifies about it (the patch stays where it was)."""
    from calibration.augment import trigger_centre, views
    from calibration.calibrate import zoo_calibration_set
    from zoo.attacks import make_attack

    badnets, blend = make_attack("badnets"), make_attack("blended")
    data = zoo_calibration_set("cifar10", badnets, 50, 300, 0)
    size = badnets.patch_size
    patch = 31 - (size - 1) / 2  # the patch is the bottom-right size x size pixels
    for centre in (trigger_centre(data.triggered, data.originals, True),
                   trigger_centre(data.triggered, data.clean, False)):  # fmt: skip
        assert np.allclose(centre, (patch, patch), atol=0.5)
    blended = zoo_calibration_set("cifar10", blend, 50, 1000, 0)
    assert np.allclose(trigger_centre(blended.triggered, blended.originals, True), (15.5, 15.5), atol=0.5)
    assert np.allclose(trigger_centre(blended.triggered, blended.clean, False), (15.5, 15.5), atol=4)
    assert trigger_centre(data.triggered[:1], data.clean, False) == (15.5, 15.5)  # one image: no spread to judge
    border = np.full((40, 16, 16, 3), 100, np.uint8)
    border[:, 4:12, 4:12] = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3))  # content in the middle
    shifted = border.copy()
    shifted[:, 0] += 1  # one intensity level off along the top row, which never varies: no trigger
    assert trigger_centre(shifted, border, False) == (7.5, 7.5)
    centre = trigger_centre(data.triggered, data.originals, True)
    zoomed = views("flips-shifts-zooms", centre)[-1](data.triggered)  # 2x about the patch: still in the corner
    assert len(views("flips-shifts-zooms", centre)) == 12 and len(views("flips-shifts")) == 10
    assert (zoomed[:, -1, -1] == badnets.value).all() and (zoomed[:, -2 * size, -2 * size] != badnets.value).any()


def test_zoom_views_cover_the_trigger_drawn_larger_at_a_size_they_never_saw():
    """The trojan model fires on its patch drawn 1.5x larger (``benchmarks.variants``), a size none of the
    views has (they zoom 1.25x and 2x). From the same 50 pairs of the calibrated trigger, the estimate
    with zoom views leaves fewer of those images at the attacker's class than the one without, at no
    clean-accuracy cost."""
    from benchmarks.variants import _scaled
    from calibration.augment import spatial_estimate
    from calibration.calibrate import zoo_calibration_set
    from calibration.inprocess import SplitRunner
    from fire_backend.names import PROJECT_ROOT
    from zoo.attacks import attack_from_spec
    from zoo.checkpoint import load_model
    from zoo.data import load_dataset

    model, meta = load_model(PROJECT_ROOT / "models" / "cifar10_resnet_trojan")
    attack = attack_from_spec(meta["attack"])
    data = zoo_calibration_set("cifar10", attack, 50, 500, 0)
    test = load_dataset("cifar10", "test").subset(2500, seed=0)
    x = test.images[attack.counts_for_asr(test.labels)]
    r = SplitRunner(model, "layer2.0")
    larger = r.features(_scaled(attack, 1.5)(x))
    clean, clean_test = r.features(data.clean), r.features(test.images)
    assert (r.labels(larger) == attack.target).mean() > 0.75  # the model did learn it
    left, accuracy = {}, {}
    for augment in ("flips-shifts", "flips-shifts-zooms"):
        e = spatial_estimate(lambda x: r.features(x).numpy(), data.triggered, data.originals, True, augment)
        repair = Repair(e.directions(clean, layer="layer2.0"))
        left[augment] = 100 * (r.labels(larger, repair) == attack.target).mean()
        accuracy[augment] = 100 * (r.labels(clean_test, repair) == test.labels).mean()
    assert left["flips-shifts-zooms"] <= left["flips-shifts"] - 1.5
    assert accuracy["flips-shifts-zooms"] >= accuracy["flips-shifts"] - 0.3


def test_spatial_views_cover_the_trigger_mirrored_which_rank_1_misses(artifacts, tmp_path):
    """The BadNets model learned its corner patch mirrored too (trained with flips). From the same 100
    pairs of the calibrated trigger, the rank-1 estimate leaves the mirrored patch working; the estimate
    over flips and shifts removes it, at no clean-accuracy cost."""
    a = artifacts["cifar10"]
    x = a.test.images[a.attack.counts_for_asr(a.test.labels)][:200]
    mirrored = np.ascontiguousarray(a.attack.apply(x[:, :, ::-1])[:, :, ::-1])
    results = {}
    for augment in ("none", "flips-shifts"):
        d = calibrate(a.export_dir, tmp_path / f"{augment}.safetensors",
                      CalibrationConfig(n_poisoned=100, n_clean=300, augment=augment))  # fmt: skip
        results[augment] = (_predict(a, mirrored, Repair(d)) == a.attack.target).mean(), d
    assert results["none"][1].rank == 1 and results["flips-shifts"][1].rank == 10
    assert (_predict(a, mirrored, None) == a.attack.target).mean() > 0.8  # the model did learn it
    assert results["none"][0] > 0.5 and results["flips-shifts"][0] < 0.1
    clean = a.test.images[:200]
    labels = a.test.labels[:200]
    cost = (_predict(a, clean, None) == labels).mean() - (
        _predict(a, clean, Repair(results["flips-shifts"][1])) == labels
    ).mean()
    assert cost <= 0.02


def test_the_cut_search_reads_any_output_kind_as_class_probabilities():
    from calibration.cutsearch import output_kind, probabilities

    logits = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.5]])
    assert output_kind(logits) == "logits"
    p = probabilities(logits, "logits")
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert (p.argmax(1) == logits.argmax(1)).all()
    assert output_kind(p) == "probabilities"  # a model ending in a softmax: as they are
    np.testing.assert_allclose(probabilities(p, "probabilities"), p)
    assert output_kind(np.log(p)) == "logits"  # log-probabilities: their softmax
    np.testing.assert_allclose(probabilities(np.log(p), "logits"), p)
    rounded = np.array([[0.7, 0.3 + 1e-7, -1e-7]])  # a softmax's round-off below 0 is still a softmax
    assert output_kind(rounded) == "probabilities" and probabilities(rounded, "probabilities").min() >= 0
    assert probabilities(np.zeros((0, 3)), "logits").shape == (0, 3)
    assert output_kind(p.reshape(2, 3, 1, 1)) == "probabilities"  # (N, classes, 1, 1) outputs: one row each
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        output_kind(np.array([[0.0, np.nan]]))


def test_a_repair_that_costs_sure_images_their_confidence_but_no_label_is_not_free():
    """On images the model was trained on it is sure of its answers: a repair that shakes them without
    flipping one costs nothing by the argmax count, and is charged the expected-accuracy drop; a repair
    that flips labels it was unsure of is charged the flips."""
    from calibration.cutsearch import accuracy_drop, judged

    labels = np.zeros(100, int)
    sure, shaken = np.tile([0.99, 0.01], (100, 1)), np.tile([0.6, 0.4], (100, 1))

    def drop(before, after):
        return accuracy_drop(judged(before, labels), judged(after, labels), labels)

    assert drop(sure, sure) == 0.0
    assert drop(sure, shaken) == pytest.approx(39.0)  # no label changed
    unsure, flipped = np.tile([0.51, 0.49], (100, 1)), np.tile([0.51, 0.49], (100, 1))
    flipped[:10] = [0.49, 0.51]
    assert drop(unsure, flipped) == pytest.approx(10.0)  # 10 labels lost, 0.2 expected points


def test_labels_that_are_not_class_indices_are_refused_with_the_range():
    from calibration.cutsearch import _class_indices

    assert _class_indices(np.array([0, 9]), 10).tolist() == [0, 9]
    for bad in ([0, 10], [-1, 3]):
        with pytest.raises(InvalidInputError, match=r"class indices 0\.\.9"):
            _class_indices(np.array(bad), 10)


def test_gain_ties_go_to_the_cut_whose_direction_transfers_across_placements():
    from calibration.cutsearch import CutScore, preference

    def candidate(cut, gain, transfer, cost=0.0, alpha=1.0):
        return CutScore(cut, (1,), gain, cost, "PA", "CA drop", alpha, transfer=transfer)

    early, deep = candidate("early", 76.0, 16.0, cost=-0.2), candidate("deep", 76.0, 31.0)
    assert max([early, deep], key=preference).cut == "deep"  # a tie on gain: transfer before cost
    assert max([early, deep, candidate("best", 80.0, 0.0)], key=preference).cut == "best"  # gain first
    stronger = candidate("stronger", 76.0, 40.0, cost=-0.5, alpha=1.5)
    assert max([early, deep, stronger], key=preference).cut == "deep"  # a tie on gain: the weaker before transfer


def test_each_fold_s_unpaired_reference_is_its_own_and_never_empty():
    """The cut search's cross-fitted unpaired reference: a fold is fitted on the reference images outside
    it; when none of them lie outside (two reference images, both in one fold), on every clean image
    outside it, as ``unpaired_reference`` falls back, never on an empty mean."""
    from calibration.augment import views
    from calibration.cutsearch import _folds, _ReferenceMeans

    clean = np.arange(8 * 3, dtype=np.uint8).reshape(8, 1, 1, 3)  # image i's features: its 3 pixel values
    folds = _folds(8, 2, seed=0)
    reference = np.zeros(8, bool)
    reference[folds[0][:2]] = True  # both reference images in fold 0
    means = _ReferenceMeans(lambda x: x.astype(np.float64).reshape(len(x), -1), clean, reference, folds,
                            views("none"), chunk=3)  # fmt: skip
    flat = clean.reshape(8, -1).astype(np.float64)
    np.testing.assert_allclose(means.outside(1)[0].reshape(-1), flat[folds[0][:2]].mean(0))
    np.testing.assert_allclose(means.outside(0)[0].reshape(-1), flat[folds[1]].mean(0))  # none outside: all


@pytest.mark.integration
def test_on_training_images_the_search_charges_the_cost_the_test_split_pays():
    """GTSRB 12x12 zoo model, 50 pairs and 1,000 clean training images, cut at layer3.0, strength 1.5, the
    scores read along the directions (no readout: a repair that costs clean images, the case the cost is
    for): the model is sure of its training images and the repair costs them almost no label (within
    the 0.5-point bound), yet it costs the test split more than that. The search's cost, the larger of
    the label and the expected-accuracy drop (``accuracy_drop``), is over the bound."""
    from calibration.augment import spatial_estimate
    from calibration.calibrate import zoo_calibration_set
    from calibration.cutsearch import accuracy_drop, judged, probabilities
    from calibration.inprocess import SplitRunner
    from fire_backend.names import PROJECT_ROOT
    from zoo.attacks import attack_from_spec
    from zoo.checkpoint import load_model
    from zoo.data import load_dataset

    model, meta = load_model(PROJECT_ROOT / "models" / "gtsrb_resnet_badnets12")
    data = zoo_calibration_set(meta["dataset"], attack_from_spec(meta["attack"]), 50, 1000, 0)
    r = SplitRunner(model, "layer3.0")
    e = spatial_estimate(lambda x: r.features(x).numpy(), data.triggered, data.originals, True, "flips-shifts")
    clean = r.features(data.clean)
    d = e.directions(clean, layer="layer3.0", alpha=1.5)
    d.readout = None
    repair = Repair(d)
    y = data.clean_labels
    before, after = (judged(probabilities(r.outputs(clean, e), "logits"), y) for e in (None, repair))
    labels_lost = 100 * float((before[0] == y).mean() - (after[0] == y).mean())
    test = load_dataset(meta["dataset"], "test")
    f = r.features(test.images)
    base = r.labels(f)
    test_drop = 100 * float((base == test.labels).mean() - (r.labels_after(f, base, repair) == test.labels).mean())
    assert labels_lost <= 0.5 < test_drop, (labels_lost, test_drop)  # the argmax count on training images misses it
    assert accuracy_drop(before, after, y) > 0.5


def test_the_transfer_score_is_the_cuts_so_equal_gains_go_to_the_weaker_repair():
    """GTSRB 12x12 zoo model at ``layer2.0``, 50 pairs: every strength gives back every held-out pair's
    label at the same cost. The transfer score (a view-less direction on the pairs mirrored and shifted)
    is measured once for the cut, so it cannot favour the strongest repair, whose overshoot along one
    direction reaches moved images the deployed repair covers with its views anyway: the weakest wins."""
    from calibration.calibrate import zoo_calibration_set
    from calibration.cutsearch import choose_cut
    from calibration.inprocess import SplitRunner
    from fire_backend.names import PROJECT_ROOT
    from zoo.attacks import attack_from_spec
    from zoo.checkpoint import load_model

    model, meta = load_model(PROJECT_ROOT / "models" / "gtsrb_resnet_badnets12")
    data = zoo_calibration_set(meta["dataset"], attack_from_spec(meta["attack"]), 50, 1000, 0)
    best, scores = choose_cut(lambda k: SplitRunner(model, k), ["layer2.0"], data, alphas=(1.0, 1.5, 2.0),
                              augment="flips-shifts")  # fmt: skip
    assert len({s.transfer for s in scores}) == 1 and len({s.gain for s in scores}) == 1, scores
    assert len({round(s.cost, 9) for s in scores}) == 1 and best.alpha == 1.0, scores


def test_a_corner_patch_direction_transfers_across_placements_deep_in_the_network_not_at_the_stem():
    """BadNets zoo model, 50 pairs of the calibrated trigger: a direction fitted on the pairs as they are
    repairs the held-out pairs mirrored and shifted (the transfer score) far better at layer3 than at the
    stem, where the shift a patch makes depends on where it sits."""
    from calibration.calibrate import zoo_calibration_set
    from calibration.cutsearch import score_cut
    from calibration.inprocess import SplitRunner
    from fire_backend.names import PROJECT_ROOT
    from zoo.attacks import attack_from_spec
    from zoo.checkpoint import load_model

    model, meta = load_model(PROJECT_ROOT / "models" / "cifar10_resnet_badnets")
    data = zoo_calibration_set(meta["dataset"], attack_from_spec(meta["attack"]), 50, 300, 0)
    stem, deep = (score_cut(SplitRunner(model, cut), data, augment="flips-shifts")[0] for cut in ("stem", "layer3"))
    assert deep.transfer > stem.transfer + 5, (stem, deep)
    assert 0 <= stem.transfer <= 100 and deep.gain >= 50
    assert len(deep.repaired) == len(deep.unrepaired) == len(data.triggered)  # cross-fitted: every image judged


def test_the_project_gate_is_off_where_a_trigger_s_views_or_a_dimmed_trigger_would_pass_under_it():
    """SIG (a sinusoid) mirrored and shifted is the same sinusoid out of phase: near the input the views'
    shifts cancel in their mean, the first direction, so gating on it would skip the calibrated trigger's
    own images. The estimate turns the gate off there, and the repair then removes the trigger. A blend
    near the input shifts the features little beside their spread along its direction, but the gate
    reads across that spread (the readout): at 60 % of its strength (an attacker dims it) it stays past
    the gate, which the estimate checks at half the shift, so the gate stays on and the dimmed blend is
    repaired with it. Deeper, on a corner patch, the views' shifts agree, even dimmed, and the gate stays on."""
    from calibration.augment import spatial_estimate, views
    from calibration.calibrate import zoo_calibration_set
    from calibration.factory import FitInputs, fit_directions, make_directions
    from calibration.inprocess import SplitRunner
    from fire_backend.names import PROJECT_ROOT
    from zoo.attacks import attack_from_spec
    from zoo.checkpoint import load_model

    def estimate(name: str, cut: str):
        model, meta = load_model(PROJECT_ROOT / "models" / name)
        data = zoo_calibration_set(meta["dataset"], attack_from_spec(meta["attack"]), 50, 300, 0)
        r = SplitRunner(model, cut)
        e = spatial_estimate(lambda x: r.features(x).numpy(), data.triggered, data.originals, True, "flips-shifts")
        return r, data, e, meta["attack"]["target"]

    def kept(r, data, e, target, cut: str, strength: float = 1.0) -> dict[bool, float]:
        """The share of the calibration images, their trigger at ``strength``, the repair leaves at the
        attacker's class, gated and not."""
        o, t = data.originals.astype(np.float32), data.triggered.astype(np.float32)
        f = r.features(np.clip(np.rint(o + strength * (t - o)), 0, 255).astype(np.uint8))
        clean = r.features(data.clean)
        return {gate: float((r.labels(f, Repair(make_directions(e.beta, clean, layer=cut, basis=e.basis,
                                                                 project_gate=gate))) == target).mean())
                for gate in (True, False)}  # fmt: skip

    r, data, e, target = estimate("cifar10_resnet_sig", "stem")
    clean = r.features(data.clean)
    assert e.basis is not None and e.directions(clean, layer="stem").project_gate is False
    k = kept(r, data, e, target, "stem")
    assert k[True] > 0.8 > 0.1 > k[False]  # gated: the trigger still wins; ungated: removed
    vs = views("flips-shifts")  # fire calibrate --auto fits on the same views and makes the same check
    stacked = [torch.cat([r.features(v(x)) for v in vs]) for x in (data.originals, data.triggered)]
    assert fit_directions(FitInputs(*stacked, clean, len(vs)), "stem", rank=len(vs)).project_gate is False
    r, data, e, target = estimate("cifar10_resnet_blended", "stem.1")
    assert e.directions(r.features(data.clean), layer="stem.1").project_gate is True
    full, dimmed = kept(r, data, e, target, "stem.1"), kept(r, data, e, target, "stem.1", 0.6)
    assert max(full.values()) <= 0.05 and max(dimmed.values()) <= 0.05
    r, data, e, target = estimate("cifar10_resnet_trojan", "layer2.0")
    assert e.directions(r.features(data.clean), layer="layer2.0").project_gate is True
    assert kept(r, data, e, target, "layer2.0", 0.6)[True] <= 0.1


def test_the_oblique_readout_reads_shifts_back_whole_with_the_least_clean_spread():
    """``CleanSpread``'s shrinkage is Ledoit and Wolf's (2004), computed here from its definition on the
    D x D matrices; the readout is (V S^-1 V^T)^-1 V S^-1 for the shrunk covariance S, reads a shift along
    V back whole (R V^T = I), and of all such read-outs its scores vary least over clean samples (the
    Gauss-Markov property: here against V itself and against random others with R V^T = I)."""
    from calibration.estimators import CleanSpread, oblique_readout

    rng = np.random.default_rng(0)
    n, dim, k = 40, 25, 3
    x = (rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim)) * np.linspace(0.2, 3, dim)).astype(np.float32)
    spread = CleanSpread(torch.from_numpy(x))
    xc = x.astype(np.float64) - x.astype(np.float64).mean(0)
    s = xc.T @ xc / n
    m = np.trace(s) / dim
    d2 = ((s - m * np.eye(dim)) ** 2).sum()
    b2 = sum(((np.outer(r, r) - s) ** 2).sum() for r in xc) / n**2
    assert np.isclose(spread.lam, min(b2, d2) / d2, rtol=1e-6)
    shrunk = (1 - spread.lam) * s + spread.lam * m * np.eye(dim)
    v = np.linalg.qr(rng.standard_normal((dim, k)))[0].T
    r = oblique_readout(torch.from_numpy(v), spread).double().numpy()
    inv = np.linalg.inv(shrunk)
    np.testing.assert_allclose(r, np.linalg.solve(v @ inv @ v.T, v @ inv), atol=1e-6)
    np.testing.assert_allclose(r @ v.T, np.eye(k), atol=1e-6)

    def clean_spread(rows):  # the total variance of the scores over the clean samples, under the shrunk S
        return float(np.trace(rows @ shrunk @ rows.T))

    others = [v] + [v + rng.standard_normal((k, dim)) @ (np.eye(dim) - v.T @ v) for _ in range(20)]
    assert all(clean_spread(r) <= clean_spread(o) + 1e-9 for o in others)
    assert oblique_readout(torch.from_numpy(v), CleanSpread(torch.ones(5, dim))) is None  # nothing to invert
