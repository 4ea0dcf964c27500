"""Which TensorRT engine (or TorchScript half) a GPU serves, and what it was built from.

An engine runs only on the GPU architecture (compute capability) and the TensorRT version it was
built with. Each half's version directory therefore holds one plan per (compute capability, TensorRT
version), ``model.sm86.trt10.5.plan``, listed in the GPU config's ``cc_model_filenames`` so that Triton
loads the one for the GPU it runs on, and next to it a record, ``<plan>.json``: the sha256 of the ONNX
file it was built from and of the plan itself. The repair model on a GPU checks that the engine of the
model it repairs was built from the ONNX its direction file is bound to: a stale plan fails closed.

The gpu_torch profile runs the halves as TorchScript (``model.pt`` beside ``model.onnx``, both from one
export); its record, ``model.pt.json``, binds the TorchScript file to that ONNX file the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from fire_backend.errors import FireError
from fire_backend.files import atomic_write, sha256_file
from fire_backend.names import TORCH_FILE

SERVED_TENSORRT = "10.5"  # the TensorRT of Triton 24.10 (server 2.51), which the GPU profile targets
COMPUTE_CAPABILITIES = ("7.0", "7.5", "8.0", "8.6", "8.7", "8.9", "9.0")  # V100 ... H100


class EngineBindingError(FireError, RuntimeError):
    """The engine a GPU would serve is missing, stale, or was built from another ONNX file."""


def plan_name(compute_capability: str, tensorrt: str = SERVED_TENSORRT) -> str:
    return f"model.sm{compute_capability.replace('.', '')}.trt{tensorrt}.plan"


def record_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


def write_record(plan: Path, onnx_sha256: str, tensorrt: str, compute_capability: str, gpu: str) -> Path:
    record = {
        "onnx_sha256": onnx_sha256,
        "plan_sha256": sha256_file(plan),
        "tensorrt": tensorrt,
        "compute_capability": compute_capability,
        "gpu": gpu,
    }
    return atomic_write(record_path(plan), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))


def write_torch_record(torch_file: Path, onnx_sha256: str) -> Path:
    """Bind a TorchScript half to the ONNX file exported from the same module."""
    record = {"onnx_sha256": onnx_sha256, "torch_sha256": sha256_file(torch_file)}
    return atomic_write(record_path(torch_file), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))


def check_torch_binding(version_dir: Path, onnx_sha256: str) -> Path:
    """The TorchScript half in ``version_dir``, verified to come from the export of the ONNX with
    ``onnx_sha256`` and unchanged since; raises ``EngineBindingError`` otherwise."""
    torch_file = Path(version_dir) / TORCH_FILE
    record = record_path(torch_file)
    if not torch_file.is_file() or not record.is_file():
        raise EngineBindingError(f"{torch_file}: no TorchScript half (or no record of it): the gpu_torch profile "
                                 "needs an export from torch (`fire export --torch` or a zoo model)")  # fmt: skip
    r = json.loads(record.read_text())
    if r.get("onnx_sha256") != onnx_sha256:
        raise EngineBindingError(f"{torch_file} comes from another export than the ONNX file the directions are "
                                 "bound to: rebuild the repository")  # fmt: skip
    if r.get("torch_sha256") != sha256_file(torch_file):
        raise EngineBindingError(f"{torch_file} changed after it was recorded; rebuild the repository")
    return torch_file


def check_binding(
    version_dir: Path, compute_capability: str, onnx_sha256: str, tensorrt: str = SERVED_TENSORRT
) -> Path:
    """The plan a GPU of this compute capability serves from ``version_dir``, verified to be built from
    the ONNX with ``onnx_sha256`` and unchanged since; raises ``EngineBindingError`` otherwise."""
    plan = Path(version_dir) / plan_name(compute_capability, tensorrt)
    record = record_path(plan)
    if not plan.is_file() or not record.is_file():
        raise EngineBindingError(f"{plan}: no engine (or no build record) for sm {compute_capability}, "
                                 f"TensorRT {tensorrt}: run `fire build-engines` on this GPU")  # fmt: skip
    r = json.loads(record.read_text())
    if r.get("onnx_sha256") != onnx_sha256:
        raise EngineBindingError(f"{plan} was built from another ONNX file ({str(r.get('onnx_sha256'))[:12]}...) "
                                 f"than the one the directions are bound to ({onnx_sha256[:12]}...): a stale plan; "
                                 "rebuild it with `fire build-engines --rebuild`")  # fmt: skip
    if r.get("plan_sha256") != sha256_file(plan):
        raise EngineBindingError(f"{plan} changed after it was built and recorded; rebuild it")
    return plan
