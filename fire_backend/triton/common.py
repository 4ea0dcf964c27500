"""Helpers shared by the Python-backend models (import only inside a Triton stub)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from fire_backend.formula import RepairInputError
from fire_backend.names import PARAM_INPUT_RANGE, SOURCE_HEADER


def parse_args(args: dict[str, str]) -> tuple[dict[str, Any], dict[str, str], Path]:
    """(model config, string parameters, version directory) from Triton's initialize args."""
    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    version_dir = Path(args["model_repository"]) / args["model_version"]
    return config, params, version_dir


def instance_device(torch, args: dict[str, str]):
    """The torch device Triton placed this instance on (KIND_GPU -> cuda:<id>, else the CPU)."""
    if args.get("model_instance_kind", "").upper().endswith("GPU"):
        return torch.device(f"cuda:{args['model_instance_device_id']}")
    return torch.device("cpu")


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


def input_range(params: dict[str, str]) -> tuple[float, float] | None:
    """The (low, high) pixel range a model fed by clients enforces, if its config sets one."""
    rng = params.get(PARAM_INPUT_RANGE)
    return tuple(float(v) for v in rng.split(",")) if rng else None


def request_source(request) -> str:
    """The client the gateway named for this request (its ``fire-source`` header, which Triton passes
    on as a request parameter), or "" (a request to the raw ports)."""
    try:
        value = json.loads(request.parameters() or "{}").get(SOURCE_HEADER, "")
    except (ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


def answer_batched(requests, input_name: str, output_name: str, problem: Callable[[np.ndarray], str | None],
                   run: Callable[[np.ndarray, list], np.ndarray]) -> list:  # fmt: skip
    """Answer ``requests`` with one ``run(batch, sources)`` over the concatenation of the inputs
    ``problem`` finds nothing wrong with (``sources``: each row's ``request_source``); a refused input
    gets its own error, a failed run fails the requests it held (the server keeps serving)."""
    responses = [None] * len(requests)
    arrays, owners = [], []
    for i, request in enumerate(requests):
        x = pb_utils.get_input_tensor_by_name(request, input_name).as_numpy()
        found = problem(x)
        if found:
            responses[i] = error_response(found)
        else:
            arrays.append(x)
            owners.append(i)
    if not arrays:
        return responses
    try:
        sources = [request_source(requests[i]) for i, x in zip(owners, arrays, strict=True) for _ in range(len(x))]
        out = run(arrays[0] if len(arrays) == 1 else np.concatenate(arrays), sources)
    except RepairInputError as e:
        failed = (f"FIRE repair: {e}", None)
    except Exception as e:  # noqa: BLE001 - an onnxruntime failure fails these requests, not the server
        failed = (f"inference failed: {e}", pb_utils.TritonError.INTERNAL)
    else:
        start = 0
        for i, x in zip(owners, arrays, strict=True):
            responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor(output_name, out[start : start + len(x)])])
            start += len(x)
        return responses
    for i in owners:
        responses[i] = error_response(*failed)
    return responses


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
