"""TensorRT engines for the GPU profile, built from the exported ONNX files on the GPU that serves them.

``build_tensorrt_engine`` uses the TensorRT Python API, or ``trtexec`` when only that is installed (as in
the Triton image). Before anything is built it checks what would otherwise fail late:

- the TensorRT version against the serving Triton's (an engine from another version does not load);
- every input of the ONNX file against the dims the Triton config declares: a batch axis that is
  fixed in the ONNX while the config batches, or a dim that disagrees, is refused with the file and
  the fix. Each input gets an optimization profile, batch 1..max_batch_size at the declared dims (an
  ONNX with dynamic H/W is built at the served size).

It builds in FP32 with TF32 off (so GPU logits stay within the GPU profile's tolerance of the CPU
ones), reads the ONNX from its path (weights in external data files are found next to it), and
turns a parser or builder failure into a one-line error. Several builders may share one directory
(the init containers of a Deployment's replicas on one volume): a lock per plan serialises them, the
second finds the first one's plan bound to the same ONNX and keeps it, and the plan and its record
(``fire_backend.engines``) are renamed into place under that lock, the record last. Without TensorRT
or a GPU it fails with a clear message.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fire_backend.engines import SERVED_TENSORRT, EngineBindingError, check_binding, plan_name, write_record
from fire_backend.errors import FireError, InvalidInputError, StepFailedError
from fire_backend.files import sha256_file


class TensorRTUnavailableError(FireError, RuntimeError):
    """TensorRT or a CUDA GPU is missing, or the wrong TensorRT: engines can only be built on the GPU
    machine that serves them, with the serving Triton's TensorRT."""


@dataclass(frozen=True)
class InputProfile:
    """One input's optimization profile: shapes with the batch axis first."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


# A builder writes the engine for ``onnx`` to ``plan`` with one profile per input (raises on failure).
Builder = Callable[[Path, Path, list[InputProfile], bool], None]


def _gpu() -> tuple[str, str]:
    """(compute capability "8.6", GPU name) of GPU 0."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}.{minor}", torch.cuda.get_device_name(0)
    except ImportError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=compute_cap,name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=False).stdout.strip().splitlines()  # fmt: skip
        if out:
            cc, name = (x.strip() for x in out[0].split(",", 1))
            return cc, name
    raise TensorRTUnavailableError(
        "no CUDA GPU is visible on this machine. TensorRT engines are built on the GPU machine that serves "
        "them; the CPU profile needs no engine."
    )


def check_tensorrt_version(found: str, expected: str = SERVED_TENSORRT) -> None:
    if ".".join(found.split(".")[:2]) != expected:
        raise TensorRTUnavailableError(
            f"TensorRT {found} found, the serving Triton uses {expected}: its engines would not load. Build "
            f"inside the Triton image (deploy/Dockerfile) or `pip install tensorrt=={expected}.*`"
        )


def input_profiles(
    onnx_path: Path, declared: dict[str, tuple[int, ...]], max_batch_size: int, opt_batch_size: int | None = None
) -> list[InputProfile]:
    """A profile for every graph input of ``onnx_path`` at the dims the Triton config ``declared`` (without
    the batch axis); refuses what TensorRT would reject late, naming the file and the fix."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    opt = opt_batch_size or max(1, max_batch_size // 2)
    profiles = []
    for inp in (i for i in graph.input if i.name not in initializers):
        if inp.name not in declared:
            raise InvalidInputError(f"{onnx_path}: input {inp.name!r} is not declared in the model's config "
                                    f"(declared: {sorted(declared)})")  # fmt: skip
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        want = tuple(int(d) for d in declared[inp.name])
        if max_batch_size > 0:
            if dims and dims[0] is not None:
                raise InvalidInputError(
                    f"{onnx_path}: input {inp.name!r} has a fixed batch axis ({dims[0]}) but the config batches "
                    f"up to {max_batch_size}: export it with a dynamic batch axis (`fire export` does), or serve "
                    "it with max_batch_size 0"
                )
            dims = dims[1:]
        if len(dims) != len(want) or any(d is not None and d != w for d, w in zip(dims, want, strict=False)):
            raise InvalidInputError(f"{onnx_path}: input {inp.name!r} has dims {dims} (None: dynamic), the config "
                                    f"declares {list(want)}")  # fmt: skip
        if any(w < 1 for w in want):
            raise InvalidInputError(f"{onnx_path}: input {inp.name!r}: the config leaves dims {list(want)} "
                                    "open; an engine needs the served size")  # fmt: skip
        if max_batch_size > 0:
            profiles.append(InputProfile(inp.name, (1, *want), (opt, *want), (max_batch_size, *want)))
        else:
            profiles.append(InputProfile(inp.name, want, want, want))
    return profiles


def _builder() -> tuple[str, Builder]:
    """(TensorRT version, builder) of what is installed: the Python API, else trtexec."""
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
    if trt is not None:
        return trt.__version__, lambda onnx, plan, profiles, fp16: _build_with_api(trt, onnx, plan, profiles, fp16)
    trtexec = shutil.which("trtexec")
    if trtexec is None:
        raise TensorRTUnavailableError(
            f"TensorRT is not installed: `pip install tensorrt=={SERVED_TENSORRT}.*` (the serving Triton's) or "
            "run this inside the Triton container, which ships trtexec"
        )
    return _trtexec_version(trtexec), lambda onnx, plan, profiles, fp16: _build_with_trtexec(
        trtexec, onnx, plan, profiles, fp16
    )


@contextmanager
def _locked(version_dir: Path, plan: Path) -> Iterator[None]:
    """An exclusive lock on ``<version_dir>/.<plan>.lock`` for one build (blocks until held)."""
    with open(version_dir / f".{plan.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_tensorrt_engine(
    onnx_path: str | Path,
    version_dir: str | Path,
    max_batch_size: int,
    declared: dict[str, tuple[int, ...]],
    opt_batch_size: int | None = None,
    fp16: bool = False,
    rebuild: bool = False,
) -> Path:
    """Build ``model.sm<cc>.trt<ver>.plan`` in ``version_dir`` for this GPU, a profile per input (batch
    1..max_batch_size at the ``declared`` dims), and record the ONNX it came from. Without ``rebuild`` a
    plan already bound to this ONNX (built by a concurrent builder, say) is kept."""
    onnx_path, version_dir = Path(onnx_path), Path(version_dir)
    profiles = input_profiles(onnx_path, declared, max_batch_size, opt_batch_size)
    cc, gpu = _gpu()
    version, build = _builder()
    check_tensorrt_version(version)
    plan = version_dir / plan_name(cc)
    onnx_sha256 = sha256_file(onnx_path)
    with _locked(version_dir, plan):
        if not rebuild:
            try:
                return check_binding(version_dir, cc, onnx_sha256)  # another builder got here first
            except EngineBindingError:
                pass
        fd, tmp = tempfile.mkstemp(dir=version_dir, prefix=f".{plan.name}.", suffix=".tmp")
        os.close(fd)
        try:
            build(onnx_path, Path(tmp), profiles, fp16)
            os.replace(tmp, plan)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        write_record(plan, onnx_sha256, ".".join(version.split(".")[:2]), cc, gpu)  # atomic, after the plan
    return plan


def _trtexec_version(trtexec: str) -> str:
    out = subprocess.run([trtexec, "--help"], capture_output=True, text=True, check=False)
    m = re.search(r"TensorRT\.trtexec \[TensorRT v(\d+)(\d{2})(\d{2})\]", out.stdout + out.stderr)
    if not m:
        raise TensorRTUnavailableError(f"cannot tell the TensorRT version of {trtexec}")
    return f"{int(m.group(1))}.{int(m.group(2))}.{int(m.group(3))}"


def _build_with_api(trt, onnx_path: Path, plan_path: Path, profiles: list[InputProfile], fp16: bool) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the path: external-data weights are found beside it
        errors = "; ".join(str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors))
        raise StepFailedError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls/convolutions would miss the GPU profile's tolerance
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for p in profiles:
        profile.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise StepFailedError(f"TensorRT failed to build an engine from {onnx_path} (its log above says why)")
    plan_path.write_bytes(bytes(engine))


def _build_with_trtexec(trtexec: str, onnx_path: Path, plan_path: Path, profiles: list[InputProfile],
                        fp16: bool) -> None:  # fmt: skip
    def shapes(which: str) -> str:
        return ",".join(f"{p.name}:{'x'.join(map(str, getattr(p, which)))}" for p in profiles)

    cmd = [trtexec, f"--onnx={onnx_path}", f"--saveEngine={plan_path}", f"--minShapes={shapes('min')}",
           f"--optShapes={shapes('opt')}", f"--maxShapes={shapes('max')}", "--noTF32"]  # fmt: skip
    cmd += ["--fp16"] if fp16 else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        lines = [ln for ln in (out.stdout + out.stderr).splitlines() if "Error" in ln or "ERROR" in ln]
        raise StepFailedError(f"trtexec could not build an engine from {onnx_path} (exit {out.returncode}): "
                              f"{(lines or ['no error line printed'])[-1].strip()}")  # fmt: skip
