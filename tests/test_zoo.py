"""The attack zoo: every attack keeps images valid, poisons exactly what it promises, is deterministic,
and puts its trigger where it says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zoo.attacks import SIG, Attack, BadNetsAllToAll, Custom, Trojan, WaNet, make_attack
from zoo.data import load_dataset

NAMES = ["badnets", "blended", "wanet", "sig", "trojan", "badnets_all2all"]


@pytest.fixture(scope="module")
def split():
    return load_dataset("cifar10", "train").subset(400, seed=3)


@pytest.fixture
def custom(tmp_path) -> Custom:
    pattern = np.zeros((4, 5, 3), np.uint8)
    pattern[..., 0] = 255  # red
    Image.fromarray(pattern).save(tmp_path / "trigger.png")
    mask = np.full((4, 5), 255, np.uint8)
    mask[:, :2] = 0  # the two left columns transparent
    np.save(tmp_path / "mask.npy", mask)
    return Custom(pattern=str(tmp_path / "trigger.png"), mask=str(tmp_path / "mask.npy"), alpha=1.0)


def _all(custom: Custom) -> list[Attack]:
    # SIG at 5 %: its default 10 % is every target-class image here, the same set under any seed
    return [make_attack(n) for n in NAMES if n != "sig"] + [SIG(poison_rate=0.05), custom]


def test_every_attack_keeps_shape_dtype_and_is_deterministic(split, custom):
    for attack in _all(custom):
        out = attack.apply(split.images)
        assert out.shape == split.images.shape and out.dtype == np.uint8, attack.name
        assert not np.array_equal(out, split.images), f"{attack.name} changed nothing"
        np.testing.assert_array_equal(attack.apply(split.images), out, err_msg=attack.name)
        np.testing.assert_array_equal(attack.apply(split.images[:7]), out[:7], err_msg=f"{attack.name} per-image")
        with pytest.raises(ValueError, match="uint8"):
            attack.apply(split.images.astype(np.float32))


def test_poisoning_touches_only_the_promised_fraction(split, custom):
    for attack in _all(custom):
        x, y, mask = attack.poison_training_set(split.images, split.labels, 10, seed=5)
        expected = round(attack.poison_rate * len(split))
        if isinstance(attack, SIG):  # clean-label: only target-class images, and at most all of them
            expected = min(expected, int((split.labels == attack.target).sum()))
            assert (split.labels[mask] == attack.target).all()
        assert mask.sum() == expected, attack.name
        changed = (x != split.images).reshape(len(x), -1).any(axis=1)
        if isinstance(attack, WaNet):  # noise mode: 2x as many cross samples, warped but keeping labels
            cross = changed & ~mask
            assert abs(cross.sum() - attack.cross_ratio * expected) <= 5  # a few warps round to no change
            np.testing.assert_array_equal(y[cross], split.labels[cross])
        else:
            np.testing.assert_array_equal(changed & ~mask, np.zeros(len(x), bool), err_msg=attack.name)
        np.testing.assert_array_equal(y[~mask], split.labels[~mask], err_msg=attack.name)
        np.testing.assert_array_equal(y[mask], attack.training_labels(split.labels[mask], 10), err_msg=attack.name)
        x2, y2, mask2 = attack.poison_training_set(split.images, split.labels, 10, seed=5)
        assert np.array_equal(x2, x) and np.array_equal(y2, y) and np.array_equal(mask2, mask), "seeded"
        _, _, mask3 = attack.poison_training_set(split.images, split.labels, 10, seed=6)
        assert not np.array_equal(mask3, mask), f"{attack.name}: another seed, the same samples"


def test_labelling_rules():
    labels = np.array([0, 3, 9])
    np.testing.assert_array_equal(make_attack("badnets").target_labels(labels, 10), [0, 0, 0])
    np.testing.assert_array_equal(BadNetsAllToAll().target_labels(labels, 10), [1, 4, 0])
    np.testing.assert_array_equal(SIG().training_labels(labels, 10), labels)  # clean-label: labels stay true
    np.testing.assert_array_equal(SIG().target_labels(labels, 10), [0, 0, 0])  # ... yet the goal is class 0
    np.testing.assert_array_equal(make_attack("trojan").counts_for_asr(labels), [False, True, True])
    assert BadNetsAllToAll().counts_for_asr(labels).all()


def test_triggers_are_where_they_say():
    grey = np.full((3, 32, 32, 3), 128, np.uint8)
    # Trojan: a 7x7 mosaic at (24, 24); everything else untouched
    t = Trojan()
    out = t.apply(grey)
    np.testing.assert_array_equal(
        out[:, 24:31, 24:31], np.broadcast_to(t.trigger().pattern[24:31, 24:31], (3, 7, 7, 3))
    )
    outside = np.ones((32, 32), bool)
    outside[24:31, 24:31] = False
    assert (out[:, outside] == 128).all()
    # SIG: a horizontal sinusoid of amplitude delta, the same on every row
    diff = SIG().apply(grey).astype(int) - 128
    cols = np.arange(32)
    np.testing.assert_array_equal(diff[0, 5, :, 0], np.rint(40 * np.sin(2 * np.pi * cols * 6 / 32)).astype(int))
    assert (diff == diff[:, :1]).all()
    # WaNet: a sub-pixel warp; on a horizontal ramp (8 levels / pixel) it shifts values by under a pixel
    ramp = np.broadcast_to((np.arange(32) * 8).astype(np.uint8)[None, None, :, None], (1, 32, 32, 3)).copy()
    moved = np.abs(WaNet().apply(ramp).astype(int) - ramp)[:, 1:-1, 1:-1]
    assert moved.mean() > 0 and moved.max() <= 8


def test_custom_trigger_from_files(custom, tmp_path):
    out = custom.apply(np.zeros((2, 32, 32, 3), np.uint8))
    np.testing.assert_array_equal(out[:, 28:, 29:, 0], 255)  # opaque part, bottom-right corner
    assert (out[:, 28:, 27:29] == 0).all() and (out[:, :28] == 0).all()  # transparent columns, the rest
    half = Custom(pattern=custom.pattern, alpha=0.5, row=0, col=0).apply(np.zeros((1, 32, 32, 3), np.uint8))
    assert (half[0, :4, :5, 0] == 128).all() and (half[0, 4:] == 0).all()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Custom(pattern=str(tmp_path / "nope.png")).apply(out)
    with pytest.raises(ValueError, match="mask"):
        np.save(tmp_path / "bad.npy", np.zeros((3, 3), np.uint8))
        Custom(pattern=custom.pattern, mask=str(tmp_path / "bad.npy")).apply(out)
    with pytest.raises(ValueError, match="does not fit"):
        Custom(pattern=custom.pattern, row=30, col=30).apply(out)


def test_train_with_a_custom_trigger_from_a_config_file(custom, tmp_path):
    """`fire train --attack-config` end to end on a tiny subset: the spec lands in model.json."""
    from fire_cli.main import main

    cfg = tmp_path / "attack.json"
    cfg.write_text(json.dumps({"name": "custom", "pattern": custom.pattern, "mask": custom.mask, "target": 2}))
    out = tmp_path / "model"
    main(["train", "--attack-config", str(cfg), "--attack-param", "poison_rate=0.2", "--train-subset", "256",
          "--epochs", "1", "--widths", "8", "8", "8", "--out", str(out)])  # fmt: skip
    meta = json.loads((out / "model.json").read_text())
    assert meta["attack"] == {**custom.spec(), "target": 2, "poison_rate": 0.2}
    assert 0 <= meta["metrics"]["ASR"] <= 1


def test_a_custom_triggers_spec_carries_its_pixels(custom, tmp_path):
    """model.json and direction files keep the trigger itself: moving or deleting the files breaks nothing."""
    from zoo.attacks import attack_from_spec

    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    expected = custom.apply(images)
    spec = json.loads(json.dumps(custom.spec()))
    assert spec["pattern"] == spec["mask"] == "" and spec["pattern_png"] and spec["mask_png"]
    for f in (custom.pattern, custom.mask):
        Path(f).unlink()
    np.testing.assert_array_equal(attack_from_spec(spec).apply(images), expected)
