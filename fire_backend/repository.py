"""Write a Triton model repository serving one or more FIRE-protected models.

For each protected model ``<name>``:
  <name>_head   first half   (CPU: Python backend running head.onnx; GPU: tensorrt_plan)
  <name>_fire   the repair   (Python backend, torch via DLPack; KIND_CPU or KIND_GPU)
  <name>_tail   second half  (like the head)
  <name>        ensemble head -> fire -> tail   (the protected model)
  <name>_plain  ensemble head -> tail           (same halves, no repair: for comparison)

``config.pbtxt`` is the CPU profile; ``configs/gpu.pbtxt`` the GPU profile, chosen at server start with
``--model-config-name=gpu`` (models without one, the ensembles, fall back to config.pbtxt). Every config
is parsed with Triton's own protobuf schema before it is written.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from fire_backend.directions import DirectionFile
from fire_backend.export import FEATURES, INPUT, LOGITS, ExportInfo, build_tensorrt_engine

REPAIRED = "REPAIRED"
PROFILES = ("cpu", "gpu")


@dataclass(frozen=True)
class ServingSettings:
    """Batching and placement of the composing models (ensembles have none of their own)."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 200
    instances: int = 1
    threads: int = 1  # onnxruntime / torch threads per instance


@dataclass(frozen=True)
class ProtectedModel:
    name: str
    export_dir: Path
    directions: Path
    mode: str | None = None  # override the mode written in the direction file


@dataclass
class BuiltModel:
    name: str
    models: list[str] = field(default_factory=list)


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """Parse config.pbtxt text with Triton's schema; raises text_format.ParseError on a bad config."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _dims(shape) -> str:
    return "[ " + ", ".join(str(int(d)) for d in shape) + " ]"


def _io(kind: str, name: str, shape) -> str:
    return f'{kind} [ {{ name: "{name}" data_type: TYPE_FP32 dims: {_dims(shape)} }} ]'


def _params(params: dict[str, str]) -> str:
    items = [f'{{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()]
    return "parameters [ " + ", ".join(items) + " ]" if items else ""


def _half_config(
    name: str,
    profile: str,
    in_name: str,
    in_shape,
    out_name: str,
    out_shape,
    s: ServingSettings,
    params: dict[str, str],
) -> str:
    if profile == "cpu":
        head = f'backend: "python"\n{_params({**params, "THREADS": str(s.threads)})}'
        kind = "KIND_CPU"
    else:
        head = 'platform: "tensorrt_plan"\ndefault_model_filename: "model.plan"'
        kind = "KIND_GPU"
    return f"""name: "{name}"
{head}
max_batch_size: {s.max_batch_size}
{_io("input", in_name, in_shape)}
{_io("output", out_name, out_shape)}
instance_group [ {{ kind: {kind} count: {s.instances} }} ]
dynamic_batching {{ max_queue_delay_microseconds: {s.max_queue_delay_us} }}
"""


def _repair_config(name: str, profile: str, shape, s: ServingSettings, params: dict[str, str]) -> str:
    kind = "KIND_CPU" if profile == "cpu" else "KIND_GPU"
    if profile == "gpu":  # let CUDA activations reach the model without a copy to host
        params = {**params, "FORCE_CPU_ONLY_INPUT_TENSORS": "no"}
    return f"""name: "{name}"
backend: "python"
max_batch_size: {s.max_batch_size}
{_io("input", FEATURES, shape)}
{_io("output", REPAIRED, shape)}
instance_group [ {{ kind: {kind} count: {s.instances} }} ]
dynamic_batching {{ max_queue_delay_microseconds: {s.max_queue_delay_us} }}
{_params({**params, "THREADS": str(s.threads)})}
"""


def _ensemble_config(name: str, steps: list[tuple[str, str, str]], info: ExportInfo, s: ServingSettings) -> str:
    """``steps``: (model, its input, its output); tensors are chained from INPUT to LOGITS."""
    blocks, current = [], INPUT
    for i, (model, in_name, out_name) in enumerate(steps):
        nxt = LOGITS if i == len(steps) - 1 else f"{model}_out"
        blocks.append(
            f'{{ model_name: "{model}" model_version: -1 input_map {{ key: "{in_name}" value: "{current}" }} '
            f'output_map {{ key: "{out_name}" value: "{nxt}" }} }}'
        )
        current = nxt
    joined = ",\n  ".join(blocks)
    return f"""name: "{name}"
platform: "ensemble"
max_batch_size: {s.max_batch_size}
{_io("input", INPUT, info.input_shape)}
{_io("output", LOGITS, [info.num_classes])}
ensemble_scheduling {{ step [
  {joined}
] }}
"""


def _shim(module: str) -> str:
    return (
        f'"""Triton entry point: a shim over {module} (the code lives there)."""\n\n'
        f"from {module} import TritonPythonModel  # noqa: F401\n"
    )


def _write_config(model_dir: Path, text: str, profile: str = "cpu") -> None:
    parse_config(text)  # never write a config Triton would reject
    path = model_dir / "config.pbtxt" if profile == "cpu" else model_dir / "configs" / f"{profile}.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def build_repository(
    models: list[ProtectedModel], out_dir: str | Path, settings: ServingSettings | None = None, tensorrt: bool = False
) -> list[BuiltModel]:
    """Write the repository for ``models`` into ``out_dir`` (their old directories are replaced).

    With ``tensorrt=True`` also build the GPU profile's engines (GPU machine with TensorRT only)."""
    s = settings or ServingSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"protected model names must be unique, got {names}")
    built = []
    for m in models:
        info = ExportInfo.read(m.export_dir)
        # Fail at build time on a direction file that the repair model would refuse at load time.
        DirectionFile.load(m.directions, feature_shape=tuple(info.feature_shape), head_sha256=info.head_sha256)
        head, fire, tail = f"{m.name}_head", f"{m.name}_fire", f"{m.name}_tail"
        for d in (head, fire, tail, m.name, f"{m.name}_plain"):
            shutil.rmtree(out / d, ignore_errors=True)
        for half, in_name, in_shape, out_name, out_shape, extra in (
            (head, INPUT, info.input_shape, FEATURES, info.feature_shape, {"INPUT_RANGE": "0,1"}),
            (tail, FEATURES, info.feature_shape, LOGITS, [info.num_classes], {}),
        ):
            version = out / half / "1"
            version.mkdir(parents=True)
            src = Path(m.export_dir) / ("head.onnx" if half == head else "tail.onnx")
            shutil.copyfile(src, version / "model.onnx")
            (version / "model.py").write_text(_shim("fire_backend.triton.onnx_half"))
            for profile in PROFILES:
                _write_config(
                    out / half, _half_config(half, profile, in_name, in_shape, out_name, out_shape, s, extra), profile
                )
            if tensorrt:
                build_tensorrt_engine(version / "model.onnx", version / "model.plan", s.max_batch_size)
        version = out / fire / "1"
        version.mkdir(parents=True)
        shutil.copyfile(m.directions, version / "directions.safetensors")
        (version / "model.py").write_text(_shim("fire_backend.triton.repair_model"))
        params = {"DIRECTIONS": "directions.safetensors", "HEAD_ONNX": f"{head}/1/model.onnx"}
        if m.mode:
            params["MODE"] = m.mode
        for profile in PROFILES:
            _write_config(out / fire, _repair_config(fire, profile, info.feature_shape, s, params), profile)
        protected = [(head, INPUT, FEATURES), (fire, FEATURES, REPAIRED), (tail, FEATURES, LOGITS)]
        for ens, steps in ((m.name, protected), (f"{m.name}_plain", [protected[0], protected[2]])):
            (out / ens / "1").mkdir(parents=True)
            _write_config(out / ens, _ensemble_config(ens, steps, info, s))
        built.append(BuiltModel(m.name, [head, fire, tail, m.name, f"{m.name}_plain"]))
    return built
