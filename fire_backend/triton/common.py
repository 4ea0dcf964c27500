"""Helpers shared by the Python-backend models (import only inside a Triton stub)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils


def parse_args(args: dict[str, str]) -> tuple[dict[str, Any], dict[str, str], Path]:
    """(model config, string parameters, version directory) from Triton's initialize args."""
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    version_dir = Path(args["model_repository"]) / args["model_version"]
    return config, params, version_dir


def error_response(message: str, code=None) -> Any:
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
