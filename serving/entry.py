"""A model already deployed in a Triton model repository, as FIRE needs to know it.

``read_entry(repo, model)`` reads ``config.pbtxt`` and finds the ONNX file FIRE can cut: the model file of
an ``onnxruntime_onnx`` model, or the ONNX next to a ``tensorrt_plan``'s engine. It keeps what existing
clients depend on (input and output names, data types, dims, format, max_batch_size), so the protected
ensemble written in its place answers them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from fire_backend.errors import FireError
from fire_backend.names import TRITON_ONNX_FILE
from serving.configs import DTYPES, TensorSpec, read_config

SPLITTABLE = ("onnxruntime_onnx", "tensorrt_plan")
_FORMATS = {mc.ModelInput.FORMAT_NCHW: "NCHW", mc.ModelInput.FORMAT_NHWC: "NHWC"}


class EntryError(FireError, ValueError):
    """The repository entry cannot be protected as it is; the message says why and what to do."""


@dataclass(frozen=True)
class Entry:
    name: str
    directory: Path
    config: mc.ModelConfig
    onnx: Path
    input: TensorSpec
    output: TensorSpec

    @property
    def max_batch_size(self) -> int:
        return self.config.max_batch_size


def _platform(cfg: mc.ModelConfig) -> str:
    if cfg.platform:
        return cfg.platform
    return {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}.get(cfg.backend, cfg.backend)


def _spec(tensor, where: str) -> TensorSpec:
    dtype = next((k for k, v in DTYPES.items() if v == tensor.data_type), None)
    if dtype is None:
        raise EntryError(f"{where}: tensor {tensor.name!r} has type {mc.DataType.Name(tensor.data_type)}, not served")
    fmt = _FORMATS.get(getattr(tensor, "format", mc.ModelInput.FORMAT_NONE), "NONE")
    return TensorSpec(tensor.name, tuple(tensor.dims), dtype, fmt)


def read_entry(repository: str | Path, model: str) -> Entry:
    directory = Path(repository) / model
    config_file = directory / "config.pbtxt"
    if not config_file.is_file():
        raise EntryError(f"{config_file}: not found (is {model!r} a model in {repository}?)")
    cfg = read_config(directory)
    where = str(config_file)
    platform = _platform(cfg)
    if platform not in SPLITTABLE:
        raise EntryError(
            f"{where}: platform {platform or cfg.backend!r} cannot be split by FIRE; it needs an ONNX model "
            f"({', '.join(SPLITTABLE)}, the latter with its ONNX file next to the plan). Export the model to "
            "ONNX and use `fire protect --onnx`"
        )
    if len(cfg.input) != 1 or len(cfg.output) != 1:
        raise EntryError(f"{where}: FIRE protects models with one input and one output, this one has "
                         f"{len(cfg.input)} and {len(cfg.output)}")  # fmt: skip
    if cfg.max_batch_size < 1:
        raise EntryError(f"{where}: max_batch_size is {cfg.max_batch_size}; FIRE's halves batch, set it to >= 1")
    versions = sorted((p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise EntryError(f"{directory}: no version directory (1/, 2/, ...)")
    version = versions[-1]
    if platform == "onnxruntime_onnx":
        onnx_file = version / (cfg.default_model_filename or TRITON_ONNX_FILE)
    else:
        onnx_file = version / TRITON_ONNX_FILE  # the ONNX the plan was built from, beside it
    if not onnx_file.is_file():
        raise EntryError(
            f"{where}: no ONNX file at {onnx_file}"
            + ("; put the ONNX the TensorRT plan was built from next to it" if platform == "tensorrt_plan" else "")
        )
    return Entry(model, directory, cfg, onnx_file, _spec(cfg.input[0], where), _spec(cfg.output[0], where))
