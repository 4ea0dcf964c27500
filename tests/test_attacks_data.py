import numpy as np
import pytest

from zoo.attacks import BadNets, Blended, attack_from_spec, make_attack
from zoo.data import DATA_ENV, DatasetMissingError, load_dataset, to_tensor_batch


@pytest.fixture(scope="module")
def images():
    return load_dataset("cifar10", "test").subset(64, seed=0)


def test_badnets_stamps_a_white_bottom_right_patch_only(images):
    out = BadNets().apply(images.images)
    assert (out[:, -3:, -3:] == 255).all()
    np.testing.assert_array_equal(out[:, :-3], images.images[:, :-3])
    np.testing.assert_array_equal(out[:, -3:, :-3], images.images[:, -3:, :-3])


def test_blended_mixes_a_fixed_pattern(images):
    attack = Blended(alpha=0.2)
    trig = attack.trigger()
    expected = np.clip(np.rint(0.8 * images.images.astype(np.float32) + 0.2 * trig.pattern), 0, 255)
    np.testing.assert_array_equal(attack.apply(images.images), expected.astype(np.uint8))
    np.testing.assert_array_equal(Blended(alpha=0.2).trigger().pattern, trig.pattern)  # seeded: reproducible


def test_poison_training_set_rate_and_labels(images):
    x, y, mask = BadNets(target=3, poison_rate=0.25).poison_training_set(images.images, images.labels, 10, seed=1)
    assert mask.sum() == 16 and (y[mask] == 3).all()
    np.testing.assert_array_equal(y[~mask], images.labels[~mask])
    assert (x[mask][:, -3:, -3:] == 255).all()


def test_attack_spec_round_trip():
    a = make_attack("blended", alpha=0.1, target=2)
    assert attack_from_spec(a.spec()) == a
    with pytest.raises(ValueError, match="unknown attack"):
        make_attack("nope")


def test_real_splits_have_the_documented_shapes():
    for name, n_train, n_test, k in (("cifar10", 50_000, 10_000, 10), ("gtsrb", 39_209, 12_630, 43)):
        train, test = load_dataset(name, "train"), load_dataset(name, "test")
        assert train.images.shape == (n_train, 32, 32, 3) and test.images.shape == (n_test, 32, 32, 3)
        assert set(np.unique(test.labels)) == set(range(k))
    x = to_tensor_batch(test.images[:2])
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1


def test_missing_data_names_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    monkeypatch.setenv("FIRE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(DatasetMissingError, match=DATA_ENV):
        load_dataset("cifar10", "train")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "empty"))
    with pytest.raises(DatasetMissingError, match="cifar10-jpeg.tar.xz"):
        load_dataset("cifar10", "train")
