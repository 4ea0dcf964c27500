"""Hot-reload a protected model's direction file on a running server (model control, admin key).

The server runs with ``--model-control-mode=explicit`` (see ``server.py``); Triton builds the new
repair instance while the old one serves, then switches, so a reload fails no request.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fire_backend.directions import DirectionFile
from fire_backend.files import sha256_file
from fire_backend.names import DIRECTIONS_FILE, FEATURES, MODEL_VERSION, PARAM_PRODUCER_ONNX
from serving.admin import ControlError, load_model
from serving.configs import read_config


def deployed_expectations(repository: Path, repair_model: str) -> tuple[tuple[int, ...], str]:
    """Feature shape and producer sha256 the repair model will check a direction file against."""
    cfg = read_config(Path(repository) / repair_model)
    (features,) = [t for t in cfg.input if t.name == FEATURES]
    producer = Path(repository) / cfg.parameters[PARAM_PRODUCER_ONNX].string_value
    return tuple(features.dims), sha256_file(producer)


def reload_directions(
    http_url: str, admin_key: str, repository: str | Path, repair_model: str, new_directions: str | Path
) -> DirectionFile:
    """Swap in a new direction file and reload the repair model with zero failed requests.

    The file is validated against the deployment first (a bad file never reaches the repository), then
    moved in atomically; if the server still refuses it, the previous file is put back so that a restart
    serves what is serving now."""
    repository = Path(repository)
    shape, head_sha = deployed_expectations(repository, repair_model)
    d = DirectionFile.load(new_directions, feature_shape=shape, head_sha256=head_sha)
    target = repository / repair_model / MODEL_VERSION / DIRECTIONS_FILE
    backup = target.with_name(DIRECTIONS_FILE + ".previous")
    staged = target.with_name(f".{DIRECTIONS_FILE}.incoming")
    shutil.copy2(target, backup)
    shutil.copyfile(new_directions, staged)
    os.replace(staged, target)
    try:
        load_model(http_url, admin_key, repair_model)
    except ControlError:
        os.replace(backup, target)
        raise
    return d
