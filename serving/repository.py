"""Write a Triton model repository serving one or more FIRE-protected models.

For each protected model ``<name>`` (model names: ``fire_backend.names.ModelNames``):
  <name>_head   first half   (CPU: Python backend running head.onnx; GPU: tensorrt_plan)
  <name>_fire   the repair   (Python backend, torch via DLPack; KIND_CPU or KIND_GPU)
  <name>_tail   second half  (like the head)
  <name>        ensemble head -> fire -> tail   (the protected model)
  <name>_plain  ensemble head -> tail           (same halves, no repair: for comparison)
with a second layer (an export made with ``layer2``, and ``directions2``): multi-layer repair,
  <name>_head -> <name>_fire -> <name>_mid -> <name>_fire2 -> <name>_tail
optionally:
  <name>_<suffix>         more protected variants sharing the halves, each with its own repair step
                          <name>_fire_<suffix> (another mode, or another direction file)
  <name>_fused            head -> repair -> tail folded into one ONNX graph (no extra hops; a new
                          direction file is a new version, ``serving.control.swap_fused``);
                          <name>_<suffix>_fused for a variant
  <name>_whole            the unsplit model, unprotected, as one model (the serving baseline)

``config.pbtxt`` is the CPU profile; ``configs/gpu.pbtxt`` the GPU profile (TensorRT halves) and
``configs/gpu_torch.pbtxt`` the GPU profile without TensorRT (the halves' TorchScript twins run by torch,
written where the export came from torch), chosen at server start with ``--model-config-name`` (models
without one, the ensembles among them, fall back to config.pbtxt). Configs are built as Triton's own
``ModelConfig`` messages (``serving.configs``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fire_backend.directions import DirectionFile
from fire_backend.engines import write_torch_record
from fire_backend.errors import InvalidInputError, MissingFileError
from fire_backend.files import sha256_file
from fire_backend.names import (
    CPU_PROFILE,
    DIRECTIONS_FILE,
    FEATURES,
    FEATURES2,
    FUSED_SOURCES,
    GPU_PROFILE,
    GPU_TORCH_PROFILE,
    GUARDED,
    HALVES_TENSORRT,
    HALVES_TORCH,
    HEAD_ONNX,
    LABELS_FILE,
    METRICS_LEVELS,
    METRICS_ON,
    MID_ONNX,
    MODEL_VERSION,
    PARAM_CHECK_FINITE,
    PARAM_DIRECTIONS,
    PARAM_DIRECTIONS_OF,
    PARAM_GUARD_INPUT,
    PARAM_HALVES,
    PARAM_INPUT_RANGE,
    PARAM_METRICS,
    PARAM_MODE,
    PARAM_ONNX_FILE,
    PARAM_PREPROCESS,
    PARAM_PRODUCER_ONNX,
    PARAM_TRAFFIC_STATS,
    REPAIRED,
    SPLIT_JSON,
    SUFFIXES,
    TAIL_ONNX,
    TORCH_FILE,
    TORCH_STUB_FILE,
    TORCHSCRIPT,
    TRITON_ONNX_FILE,
    WHOLE_ONNX,
    ModelNames,
)
from modelio.export import ExportInfo
from modelio.fuse import build_folded_onnx, build_fused_onnx
from modelio.tensorrt import build_tensorrt_engine
from serving.configs import (
    DTYPES,
    ServingSettings,
    Step,
    TensorSpec,
    config_path,
    ensemble,
    python_model,
    read_config,
    tensorrt_model,
    write_config,
)

PARAM_ROLE, PROTECTED_ROLE = "FIRE_ROLE", "protected"  # marks fused and folded models (the gateway serves them)
FEATURE_POLICY = {PARAM_CHECK_FINITE: "1"}  # models fed features refuse NaN / Inf, like the repair
RECORDING_TAIL_POLICY = {**FEATURE_POLICY, PARAM_TRAFFIC_STATS: "1"}  # the tail records traffic (--from-traffic)
STUBS = {
    "onnx": "fire_backend.triton.onnx_model",
    "repair": "fire_backend.triton.repair_model",
    "guard": "fire_backend.triton.guard_model",
    "folded": "fire_backend.triton.folded_model",
    "torch": "fire_backend.triton.torch_model",
}


@dataclass(frozen=True)
class Variant:
    """Another protected ensemble on the same halves: ``<name>_<suffix>`` with its own repair step."""

    suffix: str
    mode: str | None = None  # override the mode written in the direction file
    directions: Path | None = None  # None: the protected model's own file
    fused: bool = False  # also serve <name>_<suffix>_fused

    @classmethod
    def of_mode(cls, mode: str) -> Variant:
        return cls(mode, mode=mode)


@dataclass(frozen=True)
class ProtectedModel:
    name: str
    export_dir: Path
    directions: Path
    mode: str | None = None  # override the mode written in the direction file
    variants: tuple[Variant, ...] = ()  # also serve <name>_<suffix> for each of these
    fused: bool = False  # also serve <name>_fused
    whole: bool = False  # also serve <name>_whole
    folded: bool = False  # also serve <name>_folded (CPU: one stub, zero hops, hot-swappable directions)
    directions2: Path | None = None  # multi-layer: the direction file for the export's second layer
    plain: bool = False  # also serve <name>_plain (head -> tail, unprotected): benchmarks and comparisons only
    io: tuple[TensorSpec, TensorSpec] | None = None  # the served input/output (a drop-in keeps the original's)
    record_traffic: bool = False  # the tail keeps feature statistics of what it serves (observe mode)
    metrics: str = METRICS_ON  # off, on, or detailed (+ per-sample scores: readable by anyone on the metrics port)

    def __post_init__(self) -> None:
        if self.metrics not in METRICS_LEVELS:
            raise InvalidInputError(f"{self.name}: metrics must be one of {METRICS_LEVELS}, got {self.metrics!r}")


@dataclass
class BuiltModel:
    name: str
    models: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Stage:
    """A model in a chain and the tensors it reads and writes."""

    model: str
    input: str
    output: str


def _shim(module: str) -> str:
    return (
        f'"""Triton entry point: a shim over {module} (the code lives there)."""\n\n'
        f"from {module} import TritonPythonModel  # noqa: F401\n"
    )


class _Writer:
    """Writes models into one repository with one set of serving settings."""

    def __init__(self, out: Path, settings: ServingSettings):
        self.out, self.s = out, settings
        self.written: list[str] = []

    def _fresh(self, name: str) -> Path:
        model_dir = self.out / name
        shutil.rmtree(model_dir, ignore_errors=True)
        (model_dir / MODEL_VERSION).mkdir(parents=True)
        self.written.append(name)
        return model_dir

    def onnx_model(self, name: str, src: Path, inp: TensorSpec, out: TensorSpec, params: dict[str, str]) -> None:
        """Served from one ONNX file: onnxruntime in the Python backend (CPU), a TensorRT plan (GPU), or
        its TorchScript twin from the same export run by torch (gpu_torch), where the export has one."""
        model_dir = self._fresh(name)
        self._onnx_files(model_dir, src)
        write_config(model_dir, python_model(name, [inp], [out], self.s, params), CPU_PROFILE)
        write_config(model_dir, tensorrt_model(name, [inp], [out], self.s), GPU_PROFILE)
        self._torch_half(model_dir, src, inp, out, params)

    def _torch_half(self, model_dir: Path, src: Path, inp: TensorSpec, out: TensorSpec, params: dict) -> None:
        """The gpu_torch profile of a model served from ``src``: its TorchScript twin (``TORCHSCRIPT``),
        bound to the ONNX file by a record, run by the torch stub on a GPU instance."""
        twin = src.parent / TORCHSCRIPT.get(src.name, "")
        if src.name not in TORCHSCRIPT or not twin.is_file():
            return  # an ONNX source or a fused graph: on gpu_torch this model runs from its CPU config
        version = model_dir / MODEL_VERSION
        shutil.copyfile(twin, version / TORCH_FILE)
        write_torch_record(version / TORCH_FILE, sha256_file(version / WHOLE_ONNX))
        (version / TORCH_STUB_FILE).write_text(_shim(STUBS["torch"]))
        gpu_params = {**params, "FORCE_CPU_ONLY_INPUT_TENSORS": "no"}  # CUDA tensors between the steps
        config = python_model(model_dir.name, [inp], [out], self.s, gpu_params, gpu=True)
        config.default_model_filename = TORCH_STUB_FILE
        write_config(model_dir, config, GPU_TORCH_PROFILE)

    def has_torch_half(self, name: str) -> bool:
        return config_path(self.out / name, GPU_TORCH_PROFILE).is_file()

    def _onnx_files(self, model_dir: Path, src: Path) -> None:
        version = model_dir / MODEL_VERSION
        shutil.copyfile(src, version / WHOLE_ONNX)
        (version / "model.py").write_text(_shim(STUBS["onnx"]))

    def guard(self, name: str, inp: TensorSpec, policy: dict[str, str]) -> None:
        """The GPU profile's input check (a TensorRT head cannot refuse bad pixels)."""
        model_dir = self._fresh(name)
        (model_dir / MODEL_VERSION / "model.py").write_text(_shim(STUBS["guard"]))
        params = {PARAM_GUARD_INPUT: inp.name, PARAM_INPUT_RANGE: policy[PARAM_INPUT_RANGE]}
        io = ([inp], [TensorSpec(GUARDED, inp.dims, inp.dtype)])
        write_config(model_dir, python_model(name, *io, self.s, params), CPU_PROFILE)
        gpu_params = {**params, "FORCE_CPU_ONLY_INPUT_TENSORS": "no"}
        write_config(model_dir, python_model(name, *io, self.s, gpu_params, gpu=True), GPU_PROFILE)

    def pixel_onnx_model(
        self, name: str, src: Path, inp: TensorSpec, out: TensorSpec, policy: dict[str, str], guard: str | None
    ) -> None:
        """A whole model that takes client pixels (the unsplit or the fused model). CPU: checked by its
        own stub. GPU, with a guard: the ensemble guard -> ``<name>_engine`` (the TensorRT plan); on the
        CPU profile ``<name>_engine`` is an alias of ``<name>``, loaded for free and never called."""
        if guard is None:
            return self.onnx_model(name, src, inp, out, policy)
        engine = f"{name}_engine"
        model_dir = self._fresh(name)
        self._onnx_files(model_dir, src)
        write_config(model_dir, python_model(name, [inp], [out], self.s, policy), CPU_PROFILE)
        self._torch_half(model_dir, src, inp, out, policy)  # gpu_torch: the torch stub checks the pixels itself
        chain = [Stage(guard, inp.name, GUARDED), Stage(engine, inp.name, out.name)]
        self._ensemble_config(model_dir, name, inp, out, chain, GPU_PROFILE)
        engine_dir = self._fresh(engine)
        shutil.copyfile(src, engine_dir / MODEL_VERSION / WHOLE_ONNX)
        self._ensemble_config(engine_dir, engine, inp, out, [Stage(name, inp.name, out.name)], CPU_PROFILE)
        write_config(engine_dir, tensorrt_model(engine, [inp], [out], self.s), GPU_PROFILE)

    def repair_model(
        self, name: str, directions: Path, mode: str | None, producer: str, shape, preprocess: dict, metrics: str
    ) -> None:
        """A repair model; ``producer`` is the model whose ONNX computes its input (the file is bound to it)."""
        model_dir = self._fresh(name)
        shutil.copyfile(directions, model_dir / MODEL_VERSION / DIRECTIONS_FILE)
        (model_dir / MODEL_VERSION / "model.py").write_text(_shim(STUBS["repair"]))
        params = {
            PARAM_DIRECTIONS: DIRECTIONS_FILE,
            PARAM_PRODUCER_ONNX: f"{producer}/{MODEL_VERSION}/{WHOLE_ONNX}",
            PARAM_PREPROCESS: json.dumps(preprocess, sort_keys=True),
            PARAM_METRICS: metrics,
        }
        if mode:
            params[PARAM_MODE] = mode
        io = ([TensorSpec(FEATURES, tuple(shape))], [TensorSpec(REPAIRED, tuple(shape))])
        settings = self.s.for_repair()
        write_config(model_dir, python_model(name, *io, settings, params), CPU_PROFILE)
        gpu_params = {**params, "FORCE_CPU_ONLY_INPUT_TENSORS": "no"}  # CUDA activations reach it without a copy
        for profile, halves in ((GPU_PROFILE, HALVES_TENSORRT), (GPU_TORCH_PROFILE, HALVES_TORCH)):
            if profile == GPU_TORCH_PROFILE and not self.has_torch_half(producer):
                continue  # its head runs from the CPU config there: so does the repair (the NumPy form)
            config = python_model(name, *io, settings, {**gpu_params, PARAM_HALVES: halves}, gpu=True)
            write_config(model_dir, config, profile)

    def fused(self, name: str, export_dir: Path, directions: list, mode, inp, out, policy: dict, guard) -> None:
        """Head, repair(s) and the rest folded into one ONNX model: the direction file's tensors are
        constants, so a new file is a new model version (``serving.control.swap_fused``, Triton's version
        policy). Its export and file are kept in ``FUSED_SOURCES`` to build that version from."""
        src = build_fused_onnx(export_dir, directions, self.out / f".{name}.onnx", mode)
        try:
            params = {**policy, PARAM_ROLE: PROTECTED_ROLE, **({PARAM_MODE: mode} if mode else {})}
            self.pixel_onnx_model(name, src, inp, out, params, guard)
        finally:
            src.unlink()
        sources = self.out / name / FUSED_SOURCES
        sources.mkdir()
        files = [SPLIT_JSON, HEAD_ONNX, TAIL_ONNX] + ([MID_ONNX] if len(directions) > 1 else [])
        for f in files:
            shutil.copyfile(export_dir / f, sources / f)
        for i, d in enumerate(directions):
            shutil.copyfile(d, sources / (DIRECTIONS_FILE if i == 0 else f"{i + 1}.{DIRECTIONS_FILE}"))

    def folded(self, name: str, n: ModelNames, export_dir: Path, mode, inp, out, policy: dict, protected: str,
               metrics: str) -> None:  # fmt: skip
        """CPU: head, repair and tail as one onnxruntime session in one Python model (the repair's
        parameters as graph inputs, fed from the repair model's direction file, which it watches). GPU:
        an alias of the protected ensemble."""
        model_dir = self._fresh(name)
        version = model_dir / MODEL_VERSION
        build_folded_onnx(export_dir, version / WHOLE_ONNX)
        (version / "model.py").write_text(_shim(STUBS["folded"]))
        params = {
            PARAM_ONNX_FILE: WHOLE_ONNX,
            PARAM_PRODUCER_ONNX: f"{n.head}/{MODEL_VERSION}/{WHOLE_ONNX}",
            PARAM_DIRECTIONS_OF: n.repair,
            PARAM_ROLE: PROTECTED_ROLE,
            PARAM_METRICS: metrics,
            **policy,
        }
        if mode:
            params[PARAM_MODE] = mode
        write_config(model_dir, python_model(name, [inp], [out], self.s, params), CPU_PROFILE)
        self._ensemble_config(model_dir, name, inp, out, [Stage(protected, inp.name, out.name)], GPU_PROFILE)

    def _ensemble_config(self, model_dir: Path, name: str, inp, out, stages: list[Stage], profile: str) -> None:
        """``stages`` chained from the ensemble's input to its output, each tensor read by one step only
        (the repair edits its input in place: its producer's output must have no other reader)."""
        steps, current = [], inp.name
        for i, st in enumerate(stages):
            nxt = out.name if i == len(stages) - 1 else f"{st.model}_out"
            steps.append(Step(st.model, {st.input: current}, {st.output: nxt}))
            current = nxt
        read = [v for st in steps for v in st.inputs.values()]
        if len(read) != len(set(read)):
            raise InvalidInputError(f"{name}: a tensor feeds two steps; the in-place repair needs a single consumer")
        config = ensemble(name, [inp], [out], steps, self.s.max_batch_size)
        write_config(model_dir, config, profile)

    def ensemble(self, name: str, inp: TensorSpec, out: TensorSpec, stages: list[Stage], guard: str | None) -> None:
        """The CPU profile chains ``stages``; the GPU profile puts the input check first (``guard``)."""
        model_dir = self._fresh(name)
        self._ensemble_config(model_dir, name, inp, out, stages, CPU_PROFILE)
        if guard is not None:
            self._ensemble_config(model_dir, name, inp, out, [Stage(guard, inp.name, GUARDED), *stages], GPU_PROFILE)


def _check_directions(m: ProtectedModel, info: ExportInfo) -> None:
    """Fail at build time on a direction file that the repair model would refuse at load time."""
    for path in [m.directions] + [v.directions for v in m.variants if v.directions]:
        DirectionFile.load(path, feature_shape=tuple(info.feature_shape), head_sha256=info.head_sha256)
    if info.multilayer:
        if m.directions2 is None:
            raise InvalidInputError(f"{m.name}: the export has a second layer ({info.layer2}); give its direction file")
        if m.variants:
            raise InvalidInputError(f"{m.name}: variants are single-layer only")
        DirectionFile.load(m.directions2, feature_shape=tuple(info.feature2_shape), head_sha256=info.mid_sha256)


def input_policy(info: ExportInfo) -> dict[str, str]:
    """Parameters of a model that receives client pixels: float inputs outside what real pixels give
    (after the declared preprocessing), NaN or Inf are rejected; uint8 inputs are bounded by their type."""
    span = info.preprocessing().input_range()
    return {} if span is None else {PARAM_INPUT_RANGE: f"{span[0]!r},{span[1]!r}"}


def served_io(info: ExportInfo) -> tuple[TensorSpec, TensorSpec]:
    """The protected model's input and output as the export describes them (with its class names, if
    known: image clients ask for the top classes by name)."""
    layout = info.preprocessing().layout
    inp = TensorSpec(info.input_name, tuple(info.input_shape), info.input_dtype, layout)
    labels = LABELS_FILE if info.labels else ""
    return inp, TensorSpec(info.output_name, tuple(info.output_shape or [info.num_classes]), label_filename=labels)


def _build_one(w: _Writer, m: ProtectedModel) -> BuiltModel:
    info = ExportInfo.read(m.export_dir)
    _check_directions(m, info)
    n, src = ModelNames(m.name), Path(m.export_dir)
    first = len(w.written)
    pixels, logits = m.io or served_io(info)
    features = TensorSpec(FEATURES, tuple(info.feature_shape))
    policy = input_policy(info)
    guard = n.guard if policy else None  # uint8 inputs need none: their type is their range
    if guard:
        w.guard(guard, pixels, policy)
    w.onnx_model(n.head, src / HEAD_ONNX, pixels, features, policy)
    head = Stage(n.head, pixels.name, FEATURES)
    if info.multilayer:
        if m.folded:
            raise InvalidInputError(f"{m.name}: a folded model serves single-layer exports only (leave out folded)")
        features2 = TensorSpec(FEATURES2, tuple(info.feature2_shape))
        w.onnx_model(n.mid, src / MID_ONNX, features, features2, FEATURE_POLICY)
        w.onnx_model(n.tail, src / TAIL_ONNX, features2, logits, FEATURE_POLICY)
        w.repair_model(n.repair, m.directions, m.mode, n.head, info.feature_shape, info.preprocess, m.metrics)
        w.repair_model(n.repair2, m.directions2, m.mode, n.mid, info.feature2_shape, info.preprocess, m.metrics)
        mid, tail = Stage(n.mid, FEATURES, FEATURES2), Stage(n.tail, FEATURES2, logits.name)
        fire, fire2 = Stage(n.repair, FEATURES, REPAIRED), Stage(n.repair2, FEATURES, REPAIRED)
        w.ensemble(n.protected, pixels, logits, [head, fire, mid, fire2, tail], guard)
        if m.plain:
            w.ensemble(n.plain, pixels, logits, [head, mid, tail], guard)
        if m.fused:
            w.fused(n.fused, m.export_dir, [m.directions, m.directions2], m.mode, pixels, logits, policy, guard)
    else:
        tail_policy = {**RECORDING_TAIL_POLICY, PARAM_METRICS: m.metrics} if m.record_traffic else FEATURE_POLICY
        w.onnx_model(n.tail, src / TAIL_ONNX, features, logits, tail_policy)
        tail = Stage(n.tail, FEATURES, logits.name)
        protected = [(n.protected, n.repair, m.directions, m.mode, m.fused)] + [
            (n.variant(v.suffix), n.variant_repair(v.suffix), v.directions or m.directions, v.mode, v.fused)
            for v in m.variants
        ]
        for ensemble_name, repair, directions, mode, fused in protected:
            w.repair_model(repair, directions, mode, n.head, info.feature_shape, info.preprocess, m.metrics)
            w.ensemble(ensemble_name, pixels, logits, [head, Stage(repair, FEATURES, REPAIRED), tail], guard)
            if fused:
                fused_name = ensemble_name + SUFFIXES["fused"]
                w.fused(fused_name, m.export_dir, [directions], mode, pixels, logits, policy, guard)
        if m.plain:
            w.ensemble(n.plain, pixels, logits, [head, tail], guard)
        if m.folded:
            w.folded(n.folded, n, src, m.mode, pixels, logits, policy, n.protected, m.metrics)
    if m.whole:
        w.pixel_onnx_model(n.whole, src / WHOLE_ONNX, pixels, logits, policy, guard)
    built = w.written[first:]
    if info.labels and logits.label_filename:  # beside every config whose output names the file
        for name in built:
            if any(o.label_filename for o in read_config(w.out / name).output):
                (w.out / name / logits.label_filename).write_text("\n".join(info.labels) + "\n")
    return BuiltModel(m.name, built)


def build_repository(
    models: list[ProtectedModel], out_dir: str | Path, settings: ServingSettings | None = None, tensorrt: bool = False
) -> list[BuiltModel]:
    """Write the repository for ``models`` into ``out_dir`` (their old directories are replaced).

    Every directory is written into a hidden staging directory in ``out_dir`` first and moved in only
    once all of them are, the old ones moved aside (``_swap_in``): a build that fails leaves the
    repository as it was (a served model is never half replaced). With ``tensorrt=True`` also build the GPU profile's
    engines (GPU machine with TensorRT only)."""
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise InvalidInputError(f"protected model names must be unique, got {names}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fire-build-", dir=out))  # hidden, in the repository: renames
    try:
        w = _Writer(staging, settings or ServingSettings())
        built = [_build_one(w, m) for m in models]
        for name in w.written:
            restrict(staging / name)
        _swap_in(staging, out, w.written)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the new directories not moved in, the old ones moved out
    if tensorrt:
        build_engines(out)
        for name in w.written:
            restrict(out / name)
    return built


def _swap_in(staging: Path, out: Path, names: list[str]) -> None:
    """Each model directory ``names`` from ``staging`` into ``out``, its old one moved aside into
    ``staging`` first (renames within one file system: nothing is deleted before every new directory is
    in). If a move fails, the ones done are undone, old directories back in place, and the error raised."""
    aside = staging / ".replaced"
    aside.mkdir(exist_ok=True)
    done: list[tuple[str, bool]] = []  # (name, whether an old directory was moved aside)
    try:
        for name in names:
            had_old = (out / name).exists() or (out / name).is_symlink()
            if had_old:
                (out / name).rename(aside / name)
            done.append((name, had_old))
            (staging / name).rename(out / name)
    except OSError:
        for name, had_old in reversed(done):
            if (out / name).exists() and not (staging / name).exists():
                (out / name).rename(staging / name)
            if had_old:
                (aside / name).rename(out / name)
        raise


def restrict(path: Path) -> None:
    """No access for others: the halves and the direction file are what an adaptive attacker wants.
    Directories 0750, files 0640 (the serving user, and its group for a container's fsGroup)."""
    for p in [path, *path.rglob("*")]:
        if p.is_symlink():
            continue
        p.chmod(0o750 if p.is_dir() else 0o640)


def serve_on_cpu(model_dir: Path) -> str | None:
    """Make a copied ``onnxruntime_onnx`` model servable by the CPU profile's server (the Python backend
    only): its config.pbtxt becomes a Python-backend model running the same ONNX file with onnxruntime
    (as FIRE's halves run), and the original config stays as the GPU profile's (``configs/gpu.pbtxt``,
    for a full Triton server). Returns why it cannot be, or None once it can (or already could)."""
    cfg = read_config(model_dir)
    platform = cfg.platform or {"onnxruntime": "onnxruntime_onnx"}.get(cfg.backend, cfg.backend)
    if cfg.backend == "python" or platform == "ensemble":
        return None
    if platform != "onnxruntime_onnx":
        return (f"{cfg.name}: platform {platform!r} needs a Triton server with that backend (the CPU profile's "
                "has the Python backend only)")  # fmt: skip
    if len(cfg.input) != 1 or len(cfg.output) != 1:
        return f"{cfg.name}: {len(cfg.input)} inputs and {len(cfg.output)} outputs; FIRE's ONNX stub serves one of each"
    numpy_type = {v: k for k, v in DTYPES.items()}
    tensors = [*cfg.input, *cfg.output]
    if any(t.data_type not in numpy_type for t in tensors):
        return f"{cfg.name}: a tensor type the ONNX stub does not serve"
    specs = [TensorSpec(t.name, tuple(t.dims), numpy_type[t.data_type]) for t in tensors]
    settings = ServingSettings(max_batch_size=cfg.max_batch_size)
    params = {PARAM_ONNX_FILE: cfg.default_model_filename or TRITON_ONNX_FILE}
    if not config_path(model_dir, GPU_PROFILE).is_file():
        write_config(model_dir, cfg, GPU_PROFILE)
    write_config(model_dir, python_model(cfg.name, specs[:1], specs[1:], settings, params), CPU_PROFILE)
    for version in (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        (version / "model.py").write_text(_shim(STUBS["onnx"]))
    return None


def build_engines(repository: str | Path, profile: str = GPU_PROFILE, rebuild: bool = False) -> list[Path]:
    """Build, on this machine's GPU, the engine of every TensorRT model of ``profile`` whose plan for this
    GPU (compute capability, TensorRT version) is missing or was built from another ONNX file (a
    Kubernetes init container, see deploy/). Every model's ONNX is checked against its config first, so
    a fixed batch axis or a dim mismatch is reported before anything is built, GPU or not."""
    from fire_backend.engines import EngineBindingError, check_binding
    from modelio.tensorrt import _gpu, input_profiles

    if not Path(repository).is_dir():
        raise MissingFileError(f"{repository}: no such model repository")
    jobs = []
    for cfg_path in sorted(Path(repository).glob(f"*/configs/{profile}.pbtxt")):
        cfg = read_config(cfg_path.parent.parent, profile)
        if cfg.platform != "tensorrt_plan":
            continue
        version = cfg_path.parent.parent / MODEL_VERSION
        onnx_file = version / WHOLE_ONNX
        if not onnx_file.is_file():
            raise MissingFileError(f"{cfg.name}: no {onnx_file} to build its engine from")
        declared = {i.name: tuple(i.dims) for i in cfg.input}
        input_profiles(onnx_file, declared, cfg.max_batch_size)  # refuses what the builder would fail on late
        jobs.append((cfg, version, onnx_file, declared))
    if not jobs:
        return []
    cc, _ = _gpu()
    built = []
    for cfg, version, onnx_file, declared in jobs:
        if cc not in cfg.cc_model_filenames:
            raise InvalidInputError(f"{cfg.name}: no engine file name for compute capability {cc} in its config")
        if not rebuild:
            try:
                check_binding(version, cc, sha256_file(onnx_file))
                continue  # up to date
            except EngineBindingError:
                pass
        built.append(build_tensorrt_engine(onnx_file, version, cfg.max_batch_size, declared, rebuild=rebuild))
    return built


def is_repair_model(repository: str | Path, model: str) -> bool:
    cfg = read_config(Path(repository) / model)
    return cfg.backend == "python" and PARAM_DIRECTIONS in cfg.parameters


def is_fused_model(repository: str | Path, model: str) -> bool:
    """A fused protected model (the direction file's tensors inside its graph: swapped by version)."""
    return (Path(repository) / model / FUSED_SOURCES / SPLIT_JSON).is_file()


def repair_model_of(repository: str | Path, model: str) -> str:
    """The repair model behind ``model``: itself if it is one, else the single repair step of the
    ensemble ``model`` (a two-layer model has two: name the one you mean)."""
    repository = Path(repository)
    if not (repository / model / "config.pbtxt").is_file():
        raise InvalidInputError(f"no model {model!r} in {repository}")
    if is_repair_model(repository, model):
        return model
    cfg = read_config(repository / model)
    if PARAM_DIRECTIONS_OF in cfg.parameters:  # a folded model serves its repair model's file
        return cfg.parameters[PARAM_DIRECTIONS_OF].string_value
    repairs = [st.model_name for st in cfg.ensemble_scheduling.step if is_repair_model(repository, st.model_name)]
    if len(repairs) != 1:
        raise InvalidInputError(
            f"{model!r} has {len(repairs)} repair steps {repairs}; name the repair model itself"
            if repairs
            else f"{model!r} is not protected: it has no FIRE repair step"
        )
    return repairs[0]


def producer_of(repository: str | Path, repair_model: str) -> str:
    """The served model whose output a repair model edits (the head, or the mid model of a second layer)."""
    cfg = read_config(Path(repository) / repair_model)
    return Path(cfg.parameters[PARAM_PRODUCER_ONNX].string_value).parts[0]


@dataclass(frozen=True)
class ServedModel:
    """What a client needs to know about a protected model in a repository."""

    name: str
    input_name: str
    output_name: str
    preprocess: dict  # Preprocess.as_dict()
    directions: DirectionFile


def served_model(repository: str | Path, model: str) -> ServedModel:
    """The input/output names, preprocessing and (first) direction file of protected model ``model``."""
    repository = Path(repository)
    repair = repair_model_of(repository, model)
    cfg, params = read_config(repository / model), read_config(repository / repair).parameters
    d = DirectionFile.load(repository / repair / MODEL_VERSION / DIRECTIONS_FILE)
    pre = json.loads(params[PARAM_PREPROCESS].string_value) if PARAM_PREPROCESS in params else {}
    return ServedModel(model, cfg.input[0].name, cfg.output[0].name, pre, d)


def protected_of(repository: str | Path, model: str) -> ServedModel:
    """The protected model that ``model`` serves for or beside (itself, or ``<name>`` for ``<name>_plain``,
    ``<name>_fused``, ...): what clients of any of them need (preprocessing, the recorded attack)."""
    repository = Path(repository)
    name = model
    while True:
        try:
            return served_model(repository, name)
        except InvalidInputError:
            if "_" not in name:
                raise InvalidInputError(
                    f"{model!r} is not a protected model of {repository}, nor served beside one"
                ) from None
            name = name.rsplit("_", 1)[0]


@dataclass(frozen=True)
class Traffic:
    """What to send a served model: the dataset and attack its direction file records (or the defaults
    given), and how images become its input."""

    dataset: str
    attack: dict
    preprocess: dict  # Preprocess.as_dict(); {} for a zoo model's float pixels


def traffic_for(repository: str | Path, model: str, dataset: str | None = None, attack: dict | None = None,
                default_dataset: str = "cifar10", default_attack: str = "badnets") -> Traffic:  # fmt: skip
    """The traffic for ``model`` (any model of a protected family); what is given wins over what is
    recorded, what is recorded over the defaults."""
    try:
        served = protected_of(repository, model)
        extra, preprocess = served.directions.extra, served.preprocess
    except (InvalidInputError, OSError):
        extra, preprocess = {}, {}
    return Traffic(dataset or extra.get("dataset") or default_dataset,
                   attack or extra.get("attack") or {"name": default_attack}, preprocess)  # fmt: skip


def watchers_of(repository: str | Path, repair_model: str) -> list[str]:
    """The models that serve ``repair_model``'s direction file: itself, and folded models reading it."""
    repository = Path(repository)
    out = [repair_model]
    for cfg_path in sorted(repository.glob("*/config.pbtxt")):
        params = read_config(cfg_path.parent).parameters
        if PARAM_DIRECTIONS_OF in params and params[PARAM_DIRECTIONS_OF].string_value == repair_model:
            out.append(cfg_path.parent.name)
    return out
