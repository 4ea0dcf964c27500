"""Helpers shared by the Python-backend models (import only inside a Triton stub)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils


def parse_args(args: dict[str, str]) -> tuple[dict[str, Any], dict[str, str], Path]:
    """(model config, string parameters, version directory) from Triton's initialize args."""
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    version_dir = Path(args["model_repository"]) / args["model_version"]
    return config, params, version_dir


def require_io(config: dict[str, Any], inputs: list[str], outputs: list[str]) -> None:
    """Fail the load unless the config declares exactly these input and output tensors (by name)."""
    for kind, names, lookup in (
        ("input", inputs, pb_utils.get_input_config_by_name),
        ("output", outputs, pb_utils.get_output_config_by_name),
    ):
        declared = sorted(t["name"] for t in config.get(kind, []))
        if declared != sorted(names) or any(lookup(config, n) is None for n in names):
            raise ValueError(f"{config['name']}: config declares {kind}s {declared}, the model has {sorted(names)}")


def error_response(message: str, code=None) -> Any:
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class PeriodicFlush:
    """Work done off the request path: ``flush()`` every ``interval`` seconds on a daemon thread, and
    once more at ``close()`` (the stub's finalize)."""

    def _start_flushing(self, interval: float, thread_name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True, name=thread_name)
        self._thread.start()

    def flush(self) -> None:
        raise NotImplementedError

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()
