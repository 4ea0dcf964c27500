import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from fire_backend.directions import DirectionFile, DirectionFileError


def make(**kw) -> DirectionFile:
    g = torch.Generator().manual_seed(0)
    base = dict(
        beta=torch.randn(4, 2, 2, generator=g),
        mu=torch.randn(4, 2, 2, generator=g),
        threshold=1.5,
        layer="layer2",
        mode="project",
        alpha=1.0,
        head_sha256="ab" * 32,
        estimator="paired",
        n_poisoned=50,
        n_clean=100,
    )
    return DirectionFile(**{**base, **kw})


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    d = make(extra={"attack": {"name": "badnets"}})
    path = d.save(tmp_path / "d.safetensors")
    back = DirectionFile.load(path, feature_shape=(4, 2, 2), head_sha256="ab" * 32)
    assert np.array_equal(back.beta, d.beta) and np.array_equal(back.mu, d.mu)
    assert math.isclose(back.threshold, 1.5)
    for field in ("layer", "mode", "alpha", "head_sha256", "estimator", "n_poisoned", "n_clean", "created", "extra"):
        assert getattr(back, field) == getattr(d, field)
    assert not list(tmp_path.glob(".*.tmp")), "the atomic write leaves no temp file"


def test_the_project_gate_round_trips_files_without_it_are_gated_and_a_forged_value_is_refused(tmp_path):
    back = DirectionFile.load(make(project_gate=False).save(tmp_path / "off.safetensors"))
    assert back.project_gate is False
    good = make()
    older = {k: v for k, v in good.metadata().items() if k not in ("project_gate", "metadata_sha256")}
    _write_raw(tmp_path / "older.safetensors", good.tensors(), older)  # written before the field existed
    assert DirectionFile.load(tmp_path / "older.safetensors").project_gate is True
    _write_raw(tmp_path / "forged.safetensors", good.tensors(), {**older, "project_gate": "yes"})
    with pytest.raises(DirectionFileError, match="malformed metadata"):
        DirectionFile.load(tmp_path / "forged.safetensors")


def _write_raw(path, tensors, metadata, resign: bool = True):
    """Write a crafted file; ``resign`` recomputes the metadata checksum, as a careful forger would."""
    from fire_backend.directions import metadata_sha256

    if resign:
        metadata = {**metadata, "metadata_sha256": metadata_sha256(metadata)}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        ("missing", "not found"),
        ("truncated", "not a readable safetensors"),
        ("bad_header", "not a readable safetensors"),
        ("not_safetensors", "not a readable safetensors"),
        ("version", "unknown format version"),
        ("tampered", "tensor checksum mismatch"),
        ("metadata_tampered", "metadata checksum mismatch"),
        ("nan", "NaN or Inf"),
        ("shape_meta", "feature_shape"),
        ("missing_tensor", "missing tensors"),
    ],
)
def test_corrupt_files_are_refused_with_the_reason(tmp_path, corrupt, reason):
    good = make()
    path = tmp_path / "d.safetensors"
    good.save(path)
    raw = path.read_bytes()
    tensors, meta = good.tensors(), good.metadata()
    if corrupt == "missing":
        path.unlink()
    elif corrupt == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif corrupt == "bad_header":
        path.write_bytes((2**40).to_bytes(8, "little") + raw[8:])
    elif corrupt == "not_safetensors":
        path.write_bytes(b"\x80\x04\x95 this is a pickle, not safetensors")
    elif corrupt == "version":
        _write_raw(path, tensors, {**meta, "format_version": "99"})
    elif corrupt == "tampered":
        _write_raw(path, {**tensors, "beta": tensors["beta"] * 2}, meta)
    elif corrupt == "nan":
        bad = {**tensors, "mu": tensors["mu"].copy()}
        bad["mu"][0, 0, 0] = float("nan")
        _write_raw(path, bad, {**meta, "tensors_sha256": _checksum(bad)})
    elif corrupt == "metadata_tampered":
        _write_raw(path, tensors, {**meta, "head_sha256": "cd" * 32}, resign=False)
    elif corrupt == "shape_meta":
        _write_raw(path, tensors, {**meta, "feature_shape": json.dumps([1, 2, 3])})
    elif corrupt == "missing_tensor":
        _write_raw(path, {"beta": tensors["beta"], "mu": tensors["mu"]}, meta)
    with pytest.raises(DirectionFileError, match=reason) as e:
        DirectionFile.load(path)
    assert str(path) in str(e.value), "the message names the file"


def _checksum(tensors):
    from fire_backend.directions import tensors_sha256

    return tensors_sha256(tensors)


def test_deployment_mismatches_are_refused(tmp_path):
    path = make().save(tmp_path / "d.safetensors")
    with pytest.raises(DirectionFileError, match="does not match the deployed layer"):
        DirectionFile.load(path, feature_shape=(8, 2, 2))
    with pytest.raises(DirectionFileError, match="re-run `fire calibrate`"):
        DirectionFile.load(path, head_sha256="cd" * 32)


@pytest.mark.parametrize(
    "bad",
    [
        dict(mode="bogus"),
        dict(beta=torch.zeros(4, 2, 2)),
        dict(alpha=float("inf")),
        dict(mu=torch.zeros(3)),
        dict(beta=torch.ones(4, 2, 2, dtype=torch.float64)),
        dict(basis=torch.zeros(0, 4, 2, 2)),  # rank 0: no row to be beta / |beta|
    ],
)
def test_invalid_directions_are_never_written(tmp_path, bad):
    with pytest.raises(DirectionFileError):
        make(**bad).save(tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_corruption_is_refused_or_harmless(tmp_path, data):
    """Flip, cut or overwrite bytes anywhere in a valid file: the reader either refuses with
    DirectionFileError or (a change it cannot see, e.g. header padding) returns the same directions."""
    good = make()
    path = tmp_path / "d.safetensors"
    good.save(path)
    raw = bytearray(path.read_bytes())
    op = data.draw(st.sampled_from(["flip", "truncate", "overwrite"]))
    if op == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        i = data.draw(st.integers(0, len(raw) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=32))
        raw[i : i + len(chunk)] = chunk
    path.write_bytes(bytes(raw))
    try:
        back = DirectionFile.load(path)
    except DirectionFileError:
        return
    assert np.array_equal(back.beta, good.beta) and np.array_equal(back.mu, good.mu)
    assert back.threshold == pytest.approx(good.threshold) and back.head_sha256 == good.head_sha256


def test_fire_verify_checks_a_file_before_deployment(artifacts, tmp_path):
    import shutil
    import subprocess

    a, other = artifacts["cifar10"], artifacts["gtsrb"]
    fire = shutil.which("fire")
    ok = subprocess.run([fire, "verify", str(a.directions), str(a.export_dir)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("OK")
    bad = subprocess.run([fire, "verify", str(other.directions), str(a.export_dir)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("fire verify: ") and str(other.directions) in bad.stderr


def test_the_watcher_keeps_serving_and_watching_whatever_a_replaced_file_raises(tmp_path):
    """A replaced file that fails in any way (here: the repair cannot be built from it) is refused and
    reported; the watcher keeps the file it serves and still takes the next good one."""
    from fire_backend.reloader import DirectionWatcher

    path = tmp_path / "d.safetensors"
    make().save(path)
    calls, errors = [], []

    def build(d, mode):
        calls.append(d.alpha)
        if d.alpha == 2.0:
            raise ValueError("cannot build this one")
        return d.alpha

    w = DirectionWatcher(path, (4, 2, 2), "ab" * 32, make_repair=build, on_error=errors.append)
    make(alpha=2.0).save(path)
    assert not w.check() and w.current.repair == 1.0 and "cannot build" in str(errors[0])
    make(alpha=0.5).save(path)
    assert w.check() and w.current.repair == 0.5


def _readout_for(d: DirectionFile) -> np.ndarray:
    """A readout of ``d``'s rank-1 direction b: b tilted off itself, with readout . b = 1."""
    b = d.unit_directions()[0]
    tilt = np.random.default_rng(0).standard_normal(b.shape)
    tilt -= (tilt @ b) * b
    return (b + 0.5 * tilt).reshape(1, *d.feature_shape).astype(np.float32)


def test_a_readout_round_trips_as_version_2_and_older_or_unknown_layouts_are_refused(tmp_path):
    """A file with a readout is written as format version 2 (a FIRE that reads version 1 only refuses it,
    rather than serving its directions read the old way); one without stays version 1. A readout in a
    version-1 file, a tensor this FIRE does not know, a readout that does not read the directions back
    whole or that a non-project mode would ignore: refused, each with its reason."""
    from fire_backend.directions import metadata_sha256

    d = make()
    d.readout = _readout_for(d)
    back = DirectionFile.load(d.save(tmp_path / "r.safetensors"))
    assert np.array_equal(back.readout, d.readout) and back.metadata()["format_version"] == "2"
    assert DirectionFile.load(make().save(tmp_path / "plain.safetensors")).metadata()["format_version"] == "1"
    assert np.allclose(back.gate_row(), d.readout.reshape(-1)) and np.allclose(
        make().gate_row(), make().unit_directions()[0]
    )
    meta = {k: v for k, v in d.metadata().items() if k != "metadata_sha256"}
    _write_raw(tmp_path / "v1.safetensors", d.tensors(), {**meta, "format_version": "1"})
    with pytest.raises(DirectionFileError, match="readout in a version 1 file"):
        DirectionFile.load(tmp_path / "v1.safetensors")
    from fire_backend.directions import tensors_sha256

    extra = {**make().tensors(), "future": np.zeros(1, np.float32)}
    fields = {
        **{k: v for k, v in make().metadata().items() if k != "metadata_sha256"},
        "tensors_sha256": tensors_sha256(extra),
    }
    _write_raw(
        tmp_path / "future.safetensors", extra, {**fields, "metadata_sha256": metadata_sha256(fields)}, resign=False
    )
    with pytest.raises(DirectionFileError, match="unknown tensors"):
        DirectionFile.load(tmp_path / "future.safetensors")
    for bad, match in (
        (d.readout * 2, "not the identity"),
        (d.readout[:, :2], r"readout must be float32 \(1, 4, 2, 2\)"),
    ):
        with pytest.raises(DirectionFileError, match=match):
            make(readout=bad).save(tmp_path / "bad.safetensors")
    with pytest.raises(DirectionFileError, match="only used by mode 'project'"):
        make(mode="gated", readout=d.readout).save(tmp_path / "bad.safetensors")
