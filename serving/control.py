"""Hot-reload a protected model's direction file on a running server, without model control; and
swap a fused model's version with it (``swap_fused``).

The repair model watches its own direction file (``fire_backend.reloader``): replacing the file
atomically in the repository is the reload. ``reload_directions`` validates the new file against the
deployment first (a bad file never reaches the repository), moves it in, and, given the server's
metrics address, waits until the repair model reports the new file's checksum; if the repair model
refuses it (it then keeps serving the old one), the previous file is put back.

Who can change what a protected model serves is therefore whoever can write its repository directory
(file permissions), not whoever can reach a network port.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from fire_backend.cache import trusted_file
from fire_backend.directions import DirectionFile
from fire_backend.files import sha256_file
from fire_backend.names import (
    DIRECTIONS_FILE,
    FEATURES,
    FUSED_SOURCES,
    HEAD_ONNX,
    MODEL_VERSION,
    PARAM_MODE,
    PARAM_PRODUCER_ONNX,
    SPLIT_JSON,
    TAIL_ONNX,
    WHOLE_ONNX,
)
from serving.admin import ControlError
from serving.configs import read_config
from serving.repository import watchers_of


def deployed_expectations(repository: Path, repair_model: str) -> tuple[tuple[int, ...], str]:
    """Feature shape and producer sha256 the repair model will check a direction file against."""
    cfg = read_config(Path(repository) / repair_model)
    (features,) = [t for t in cfg.input if t.name == FEATURES]
    producer = Path(repository) / cfg.parameters[PARAM_PRODUCER_ONNX].string_value
    return tuple(features.dims), sha256_file(producer)


def scrape(metrics_url: str, timeout: float = 5.0) -> dict[tuple[str, str], float]:
    """FIRE's gauges and counters from the server's metrics endpoint: (metric, model) -> value."""
    with urllib.request.urlopen(metrics_url, timeout=timeout) as r:
        text = r.read().decode()
    out = {}
    for m in re.finditer(r'^(fire_\w+)\{[^}]*model="([^"]+)"[^}]*\} (\S+)$', text, flags=re.M):
        out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


def _serving(metrics_url: str, models: list[str]) -> tuple[list[float | None], float]:
    """(checksum gauge of each model, refused reloads of them all)."""
    values = scrape(metrics_url)
    checksums = [values.get(("fire_direction_checksum", m)) for m in models]
    return checksums, sum(values.get(("fire_direction_reload_failures_total", m), 0.0) for m in models)


def reload_directions(
    repository: str | Path,
    repair_model: str,
    new_directions: str | Path,
    metrics_url: str | None = None,
    timeout: float = 60.0,
) -> DirectionFile:
    """Swap in a new direction file; the repair model picks it up with zero failed requests.

    With ``metrics_url``: wait until the server serves it; if the server refuses it, put the previous
    file back (so that a restart serves what is serving now) and raise ``ControlError``."""
    repository = Path(repository)
    shape, head_sha = deployed_expectations(repository, repair_model)
    d = DirectionFile.load(new_directions, feature_shape=shape, head_sha256=head_sha)
    target = repository / repair_model / MODEL_VERSION / DIRECTIONS_FILE
    watchers = watchers_of(repository, repair_model)  # the repair model, and folded models reading its file
    if sha256_file(target) == sha256_file(new_directions):  # in place already: keep the previous file as it is
        if metrics_url is None or all(c == float(d.checksum32) for c in _serving(metrics_url, watchers)[0]):
            return d
        raise ControlError(f"{repair_model}: {new_directions} is in place but not served; see the server's log")
    backup = target.with_name(DIRECTIONS_FILE + ".previous")
    staged = target.with_name(f".{DIRECTIONS_FILE}.incoming")
    failures_before = _serving(metrics_url, watchers)[1] if metrics_url else 0.0
    shutil.copy2(target, backup)
    shutil.copyfile(new_directions, staged)
    os.replace(staged, target)
    if metrics_url is None:
        return d
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        checksums, failures = _serving(metrics_url, watchers)
        if all(c == float(d.checksum32) for c in checksums):
            return d
        if failures > failures_before:
            os.replace(backup, target)
            raise ControlError(f"{repair_model} refused {new_directions} and keeps serving the previous file")
        time.sleep(0.2)
    os.replace(backup, target)
    raise ControlError(f"{repair_model} did not report {new_directions} within {timeout:.0f} s; put the old file back")


def put_back_previous(repository: str | Path, repair_model: str, metrics_url: str | None = None,
                      timeout: float = 60.0) -> DirectionFile:  # fmt: skip
    """Reload the file the last ``reload_directions`` replaced (kept beside the live one), as a reload:
    checked, swapped atomically and, with ``metrics_url``, confirmed (a rollout's undo on one replica)."""
    previous = Path(repository) / repair_model / MODEL_VERSION / (DIRECTIONS_FILE + ".previous")
    if not previous.is_file():
        raise ControlError(f"{repair_model}: no previous direction file to put back (no reload since the start)")
    with tempfile.TemporaryDirectory() as tmp:  # the reload overwrites the .previous it reads
        copy = Path(tmp) / DIRECTIONS_FILE
        shutil.copyfile(previous, copy)
        return reload_directions(repository, repair_model, copy, metrics_url, timeout)


def swap_fused(repository: str | Path, fused_model: str, new_directions: str | Path, http_url: str, admin_key: str,
               timeout: float = 120.0) -> tuple[DirectionFile, int]:  # fmt: skip
    """A new direction file for a fused model (zero hops: its tensors are graph constants), by Triton's
    own version policy: the file is checked against the model's export, the fused graph is built as
    the next version, and the server is asked to load the model. Triton loads the new version beside
    the serving one, moves traffic to it once it is ready and unloads the old one after its in-flight
    requests finish; a version that fails to load is removed and the old one keeps serving. Needs the
    server in explicit model-control mode (``fire serve --model-control explicit``). Returns the file
    and the version now served; the older version directories are removed."""
    from modelio.export import ExportInfo
    from modelio.fuse import build_fused_onnx
    from serving.admin import load_model
    from serving.repository import restrict

    model_dir = Path(repository) / fused_model
    sources = model_dir / FUSED_SOURCES
    if not (sources / SPLIT_JSON).is_file():
        raise ControlError(f"{fused_model} is not a fused protected model (no {FUSED_SOURCES}/{SPLIT_JSON} in "
                           f"{model_dir}); rebuild the repository with this version of FIRE")  # fmt: skip
    with open(model_dir / ".swap.lock", "w") as lock:  # one swap at a time: versions are numbered in turn
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = ExportInfo.read(trusted_file(sources / SPLIT_JSON).parent)
        if info.multilayer:
            raise ControlError(f"{fused_model}: a two-layer fused model is rebuilt with `fire build-repo`, not swapped")
        for f in (HEAD_ONNX, TAIL_ONNX):  # what goes into the graph: this user's files, the head the one bound
            trusted_file(sources / f)
        if sha256_file(sources / HEAD_ONNX) != info.head_sha256:
            raise ControlError(f"{sources / HEAD_ONNX} is not the head {fused_model} was built from; refusing")
        d = DirectionFile.load(new_directions, feature_shape=tuple(info.feature_shape), head_sha256=info.head_sha256)
        params = read_config(model_dir).parameters
        mode = params[PARAM_MODE].string_value if PARAM_MODE in params else None
        versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
        current = model_dir / str(versions[-1])
        new = model_dir / str(versions[-1] + 1)
        staged = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{new.name}."))
        try:
            build_fused_onnx(sources, new_directions, staged / WHOLE_ONNX, mode)
            for p in current.iterdir():  # the stub and anything else the version holds, but the graph
                if p.is_file() and p.name != WHOLE_ONNX:
                    shutil.copy2(p, staged / p.name)
            shutil.copyfile(new_directions, staged / DIRECTIONS_FILE)
            os.rename(staged, new)  # fails if it exists: never over a version
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        restrict(new)
        try:
            load_model(http_url, admin_key, fused_model, timeout)
        except (ControlError, OSError) as e:  # refused, or no answer: not served, so not kept
            shutil.rmtree(new)
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ControlError(f"{fused_model} did not load version {new.name} ({why}); version {current.name} "
                               "keeps serving") from None  # fmt: skip
        shutil.copyfile(new_directions, sources / DIRECTIONS_FILE)
        for v in versions:  # Triton serves the latest version only: the older ones are unloaded
            shutil.rmtree(model_dir / str(v))
    return d, int(new.name)
