"""Triton model configurations as Triton's own protobuf messages (``model_config_pb2.ModelConfig``).

Each kind of model FIRE serves has one builder; ``write_config`` prints the message with
``text_format`` (deterministic, so generated repositories are byte-stable) and ``read_config`` parses
one back. A config that is not a valid message cannot be built, let alone written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from fire_backend.engines import COMPUTE_CAPABILITIES, plan_name
from fire_backend.errors import InvalidInputError
from fire_backend.names import MODEL_VERSION, PARAM_THREADS

DTYPES = {  # numpy dtype name -> Triton data type
    "float32": mc.TYPE_FP32,
    "float16": mc.TYPE_FP16,
    "float64": mc.TYPE_FP64,
    "uint8": mc.TYPE_UINT8,
    "int8": mc.TYPE_INT8,
    "int32": mc.TYPE_INT32,
    "int64": mc.TYPE_INT64,
}
FORMATS = {"NONE": mc.ModelInput.FORMAT_NONE, "NCHW": mc.ModelInput.FORMAT_NCHW, "NHWC": mc.ModelInput.FORMAT_NHWC}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor, without the batch axis (-1 marks a variable dimension)."""

    name: str
    dims: tuple[int, ...]
    dtype: str = "float32"
    format: str = "NONE"  # an image input: NCHW or NHWC, declared so that image clients can find it
    label_filename: str = ""  # an output: the file of class names beside the config (classification extension)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidInputError(
                f"tensor {self.name!r}: unsupported dtype {self.dtype!r}; supported: {sorted(DTYPES)}"
            )
        if self.format not in FORMATS:
            raise InvalidInputError(
                f"tensor {self.name!r}: format must be one of {sorted(FORMATS)}, got {self.format!r}"
            )


@dataclass(frozen=True)
class ServingSettings:
    """Batching and placement of the composing models (ensembles have none of their own)."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 0  # batch what is queued, never wait: each hop would add the delay at low load
    instances: int = 1  # per step: head, tail, and the zero-hop models
    repair_instances: int | None = None  # the repair step's own count (it takes microseconds); None: instances
    threads: int = 1  # onnxruntime / torch threads per instance

    def for_repair(self) -> ServingSettings:
        """The settings of a repair step: its own instance count where one is given."""
        return dataclasses.replace(self, instances=self.repair_instances or self.instances)


def _add_inputs(config: mc.ModelConfig, specs: list[TensorSpec]) -> None:
    for t in specs:
        fmt = FORMATS[t.format] if len(t.dims) == 3 else mc.ModelInput.FORMAT_NONE
        config.input.add(name=t.name, data_type=DTYPES[t.dtype], format=fmt, dims=list(t.dims))


def _add_outputs(config: mc.ModelConfig, specs: list[TensorSpec]) -> None:
    for t in specs:
        config.output.add(name=t.name, data_type=DTYPES[t.dtype], dims=list(t.dims), label_filename=t.label_filename)


def _composing(
    name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], s: ServingSettings, gpu: bool
) -> mc.ModelConfig:
    """A model that runs requests itself: batched dynamically, placed on CPU or GPU instances."""
    config = mc.ModelConfig(name=name, max_batch_size=s.max_batch_size)
    _add_inputs(config, inputs)
    _add_outputs(config, outputs)
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=kind, count=s.instances)
    config.dynamic_batching.max_queue_delay_microseconds = s.max_queue_delay_us
    config.dynamic_batching.SetInParent()  # present even with the default delay of 0
    return config


def python_model(
    name: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    settings: ServingSettings,
    parameters: dict[str, str],
    gpu: bool = False,
) -> mc.ModelConfig:
    config = _composing(name, inputs, outputs, settings, gpu)
    config.backend = "python"
    for key, value in {**parameters, PARAM_THREADS: str(settings.threads)}.items():
        config.parameters[key].string_value = value
    return config


def tensorrt_model(
    name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], settings: ServingSettings
) -> mc.ModelConfig:
    """Triton picks the engine for the GPU it runs on (one plan per compute capability and TensorRT
    version, see ``fire_backend.engines``); "model.plan" is never built, so an unlisted GPU fails to load."""
    config = _composing(name, inputs, outputs, settings, gpu=True)
    config.platform = "tensorrt_plan"
    config.default_model_filename = "model.plan"
    for cc in COMPUTE_CAPABILITIES:
        config.cc_model_filenames[cc] = plan_name(cc)
    return config


@dataclass(frozen=True)
class Step:
    """One ensemble step: ``model`` reads ``inputs`` and writes ``outputs`` (its tensor -> ensemble tensor)."""

    model: str
    inputs: dict[str, str]
    outputs: dict[str, str]


def ensemble(
    name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], steps: list[Step], max_batch_size: int
) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch_size)
    _add_inputs(config, inputs)
    _add_outputs(config, outputs)
    for st in steps:
        step = config.ensemble_scheduling.step.add(model_name=st.model, model_version=-1)
        for key, value in st.inputs.items():
            step.input_map[key] = value
        for key, value in st.outputs.items():
            step.output_map[key] = value
    return config


def config_path(model_dir: Path, profile: str = "cpu") -> Path:
    """config.pbtxt is the CPU profile (Triton's default); other profiles live in configs/<profile>.pbtxt."""
    return model_dir / "config.pbtxt" if profile == "cpu" else model_dir / "configs" / f"{profile}.pbtxt"


def write_config(model_dir: Path, config: mc.ModelConfig, profile: str = "cpu") -> Path:
    path = config_path(model_dir, profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    (model_dir / MODEL_VERSION).mkdir(parents=True, exist_ok=True)
    path.write_text(text_format.MessageToString(config))
    return path


def parse_config(text: str) -> mc.ModelConfig:
    """Parse config.pbtxt text with Triton's schema; raises text_format.ParseError on a bad config."""
    return text_format.Parse(text, mc.ModelConfig())


def read_config(model_dir: Path, profile: str = "cpu") -> mc.ModelConfig:
    return parse_config(config_path(model_dir, profile).read_text())


def from_profile(repository: Path, profile: str) -> list[str]:
    """The models of ``repository`` that run from their CPU config under ``profile`` (no
    ``configs/<profile>.pbtxt`` of their own), ensembles left out (they only route)."""
    fallbacks = []
    for model_dir in sorted(p for p in Path(repository).iterdir() if (p / "config.pbtxt").is_file()):
        if profile == "cpu" or config_path(model_dir, profile).is_file():
            continue
        if read_config(model_dir).platform != "ensemble":
            fallbacks.append(model_dir.name)
    return fallbacks


def profile_on_cpu(repository: Path, profile: str, name: str) -> list[str]:
    """Write ``configs/<name>.pbtxt`` beside every ``configs/<profile>.pbtxt`` of ``repository`` with its GPU
    instances made CPU ones: the same models, code paths and parameters on a machine without a GPU (how
    the suite and ``scripts/gpu_check.sh --cpu`` run the gpu_torch profile). Returns the models written."""
    written = []
    for path in sorted(Path(repository).glob(f"*/configs/{profile}.pbtxt")):
        model_dir = path.parent.parent
        config = read_config(model_dir, profile)
        for group in config.instance_group:
            if group.kind == mc.ModelInstanceGroup.KIND_GPU:
                group.kind = mc.ModelInstanceGroup.KIND_CPU
        write_config(model_dir, config, name)
        written.append(model_dir.name)
    return written
