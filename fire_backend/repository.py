"""Write a Triton model repository serving one or more FIRE-protected models.

For each protected model ``<name>``:
  <name>_head   first half   (CPU: Python backend running head.onnx; GPU: tensorrt_plan)
  <name>_fire   the repair   (Python backend, torch via DLPack; KIND_CPU or KIND_GPU)
  <name>_tail   second half  (like the head)
  <name>        ensemble head -> fire -> tail   (the protected model)
  <name>_plain  ensemble head -> tail           (same halves, no repair: for comparison)
with a second layer (an export made with ``layer2``, and ``directions2``): multi-layer repair,
  <name>_head -> <name>_fire -> <name>_mid -> <name>_fire2 -> <name>_tail
optionally:
  <name>_<mode>           more repair variants sharing the halves (<name>_fire_<mode> as their repair step)
  <name>_fused            head -> repair -> tail folded into one ONNX graph (no hot swap, no extra hops)
  <name>_whole            the unsplit model, unprotected, as one model (the serving baseline)

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
from fire_backend.export import FEATURES, FEATURES2, INPUT, LOGITS, ExportInfo, build_tensorrt_engine

REPAIRED = "REPAIRED"
PROFILES = ("cpu", "gpu")


@dataclass(frozen=True)
class ServingSettings:
    """Batching and placement of the composing models (ensembles have none of their own)."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 0  # batch what is queued, never wait: each hop would add the delay at low load
    instances: int = 1
    threads: int = 1  # onnxruntime / torch threads per instance


@dataclass(frozen=True)
class ProtectedModel:
    name: str
    export_dir: Path
    directions: Path
    mode: str | None = None  # override the mode written in the direction file
    extra_modes: tuple[str, ...] = ()  # also serve <name>_<mode> for each of these
    fused: bool = False  # also serve <name>_fused
    whole: bool = False  # also serve <name>_whole
    directions2: Path | None = None  # multi-layer: the direction file for the export's second layer


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


def _write_onnx_model(
    out: Path, name: str, onnx_src: Path, io: tuple, s: ServingSettings, params: dict[str, str], tensorrt: bool
) -> None:
    """A model served from one ONNX file: onnxruntime in the Python backend (CPU) or a TensorRT plan (GPU)."""
    in_name, in_shape, out_name, out_shape = io
    version = out / name / "1"
    version.mkdir(parents=True)
    shutil.copyfile(onnx_src, version / "model.onnx")
    (version / "model.py").write_text(_shim("fire_backend.triton.onnx_model"))
    for profile in PROFILES:
        text = _half_config(name, profile, in_name, in_shape, out_name, out_shape, s, params)
        _write_config(out / name, text, profile)
    if tensorrt:
        build_tensorrt_engine(version / "model.onnx", version / "model.plan", s.max_batch_size)


def _write_repair_model(
    out: Path, name: str, directions: Path, mode: str | None, producer: str, shape, s: ServingSettings
) -> None:
    """A repair model; ``producer`` is the model whose ONNX computes its input (the file is bound to it)."""
    version = out / name / "1"
    version.mkdir(parents=True)
    shutil.copyfile(directions, version / "directions.safetensors")
    (version / "model.py").write_text(_shim("fire_backend.triton.repair_model"))
    params = {"DIRECTIONS": "directions.safetensors", "HEAD_ONNX": f"{producer}/1/model.onnx"}
    if mode:
        params["MODE"] = mode
    for profile in PROFILES:
        _write_config(out / name, _repair_config(name, profile, shape, s, params), profile)


def build_repository(
    models: list[ProtectedModel], out_dir: str | Path, settings: ServingSettings | None = None, tensorrt: bool = False
) -> list[BuiltModel]:
    """Write the repository for ``models`` into ``out_dir`` (their old directories are replaced).

    With ``tensorrt=True`` also build the GPU profile's engines (GPU machine with TensorRT only)."""
    from fire_backend.fuse import build_fused_onnx

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
        if info.multilayer:
            built.append(_build_multilayer(out, m, info, s, tensorrt))
            continue
        head, fire, tail = f"{m.name}_head", f"{m.name}_fire", f"{m.name}_tail"
        variants = {m.name: (fire, m.mode)} | {f"{m.name}_{x}": (f"{fire}_{x}", x) for x in m.extra_modes}
        names = [head, tail, *(f for f, _ in variants.values()), *variants, f"{m.name}_plain"]
        names += [f"{m.name}_fused"] * m.fused + [f"{m.name}_whole"] * m.whole
        for d in names:
            shutil.rmtree(out / d, ignore_errors=True)
        pixels = (INPUT, info.input_shape, FEATURES, info.feature_shape)
        _write_onnx_model(out, head, Path(m.export_dir) / "head.onnx", pixels, s, {"INPUT_RANGE": "0,1"}, tensorrt)
        features = (FEATURES, info.feature_shape, LOGITS, [info.num_classes])
        _write_onnx_model(out, tail, Path(m.export_dir) / "tail.onnx", features, s, {}, tensorrt)
        end_to_end = (INPUT, info.input_shape, LOGITS, [info.num_classes])
        if m.whole:
            whole_src = Path(m.export_dir) / "model.onnx"
            _write_onnx_model(out, f"{m.name}_whole", whole_src, end_to_end, s, {"INPUT_RANGE": "0,1"}, tensorrt)
        if m.fused:
            fused_src = build_fused_onnx(m.export_dir, m.directions, out / f".{m.name}_fused.onnx", m.mode)
            _write_onnx_model(out, f"{m.name}_fused", fused_src, end_to_end, s, {"INPUT_RANGE": "0,1"}, tensorrt)
            fused_src.unlink()
        for ensemble, (repair, mode) in variants.items():
            _write_repair_model(out, repair, m.directions, mode, head, info.feature_shape, s)
            steps = [(head, INPUT, FEATURES), (repair, FEATURES, REPAIRED), (tail, FEATURES, LOGITS)]
            (out / ensemble / "1").mkdir(parents=True)
            _write_config(out / ensemble, _ensemble_config(ensemble, steps, info, s))
        plain = f"{m.name}_plain"
        (out / plain / "1").mkdir(parents=True)
        _write_config(
            out / plain, _ensemble_config(plain, [(head, INPUT, FEATURES), (tail, FEATURES, LOGITS)], info, s)
        )
        built.append(BuiltModel(m.name, names))
    return built


def build_engines(repository: str | Path, profile: str = "gpu", rebuild: bool = False) -> list[Path]:
    """Build the missing ``model.plan`` of every TensorRT model of ``profile`` in a repository, from the
    ``model.onnx`` next to it, on this machine's GPU (a Kubernetes init container, see deploy/)."""
    built = []
    for cfg_path in sorted(Path(repository).glob(f"*/configs/{profile}.pbtxt")):
        cfg = parse_config(cfg_path.read_text())
        if cfg.platform != "tensorrt_plan":
            continue
        version = cfg_path.parent.parent / "1"
        plan = version / (cfg.default_model_filename or "model.plan")
        if plan.is_file() and not rebuild:
            continue
        if not (version / "model.onnx").is_file():
            raise FileNotFoundError(f"{cfg.name}: no {version / 'model.onnx'} to build {plan.name} from")
        built.append(build_tensorrt_engine(version / "model.onnx", plan, cfg.max_batch_size))
    return built


def _build_multilayer(out: Path, m: ProtectedModel, info: ExportInfo, s: ServingSettings, tensorrt: bool) -> BuiltModel:
    """head -> fire -> mid -> fire2 -> tail, and the plain head -> mid -> tail."""
    if m.directions2 is None:
        raise ValueError(f"{m.name}: the export has a second layer ({info.layer2}); give its direction file")
    if m.extra_modes or m.fused:
        raise ValueError(f"{m.name}: extra modes and the fused model are single-layer only")
    DirectionFile.load(m.directions2, feature_shape=tuple(info.feature2_shape), head_sha256=info.mid_sha256)
    head, fire, mid, fire2, tail = (f"{m.name}_{p}" for p in ("head", "fire", "mid", "fire2", "tail"))
    names = [head, fire, mid, fire2, tail, m.name, f"{m.name}_plain"] + [f"{m.name}_whole"] * m.whole
    for d in names:
        shutil.rmtree(out / d, ignore_errors=True)
    src = Path(m.export_dir)
    k = [info.num_classes]
    _write_onnx_model(out, head, src / "head.onnx", (INPUT, info.input_shape, FEATURES, info.feature_shape), s,
                      {"INPUT_RANGE": "0,1"}, tensorrt)  # fmt: skip
    mid_io = (FEATURES, info.feature_shape, FEATURES2, info.feature2_shape)
    _write_onnx_model(out, mid, src / "mid.onnx", mid_io, s, {}, tensorrt)
    _write_onnx_model(out, tail, src / "tail.onnx", (FEATURES2, info.feature2_shape, LOGITS, k), s, {}, tensorrt)
    if m.whole:
        _write_onnx_model(out, f"{m.name}_whole", src / "model.onnx", (INPUT, info.input_shape, LOGITS, k), s,
                          {"INPUT_RANGE": "0,1"}, tensorrt)  # fmt: skip
    _write_repair_model(out, fire, m.directions, m.mode, head, info.feature_shape, s)
    _write_repair_model(out, fire2, m.directions2, m.mode, mid, info.feature2_shape, s)
    steps = [
        (head, INPUT, FEATURES),
        (fire, FEATURES, REPAIRED),
        (mid, FEATURES, FEATURES2),
        (fire2, FEATURES, REPAIRED),
        (tail, FEATURES2, LOGITS),
    ]
    plain = [(head, INPUT, FEATURES), (mid, FEATURES, FEATURES2), (tail, FEATURES2, LOGITS)]
    for ensemble, chain in ((m.name, steps), (f"{m.name}_plain", plain)):
        (out / ensemble / "1").mkdir(parents=True)
        _write_config(out / ensemble, _ensemble_config(ensemble, chain, info, s))
    return BuiltModel(m.name, names)
