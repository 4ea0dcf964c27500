"""TensorRT engines for the GPU profile, built from the exported ONNX files on the GPU that serves them.

``build_tensorrt_engine`` uses the TensorRT Python API, or ``trtexec`` when only that is installed (as in
the Triton image). It refuses a TensorRT whose major.minor differs from the serving Triton's (an engine
from another version does not load), builds in FP32 with TF32 off (so GPU logits stay within the GPU
profile's tolerance of the CPU ones, see README), writes the plan under a temporary name and renames
it (several pods' init containers may build into one shared volume), and records what it was built
from (``fire_backend.engines``). Without TensorRT or a GPU it fails with a clear message.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from fire_backend.engines import SERVED_TENSORRT, plan_name, write_record
from fire_backend.errors import FireError, StepFailedError
from fire_backend.files import sha256_file


class TensorRTUnavailableError(FireError, RuntimeError):
    """TensorRT or a CUDA GPU is missing, or the wrong TensorRT: engines can only be built on the GPU
    machine that serves them, with the serving Triton's TensorRT."""


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


def _trtexec_version(trtexec: str) -> str:
    out = subprocess.run([trtexec, "--help"], capture_output=True, text=True, check=False)
    m = re.search(r"TensorRT\.trtexec \[TensorRT v(\d+)(\d{2})(\d{2})\]", out.stdout + out.stderr)
    if not m:
        raise TensorRTUnavailableError(f"cannot tell the TensorRT version of {trtexec}")
    return f"{int(m.group(1))}.{int(m.group(2))}.{int(m.group(3))}"


def build_tensorrt_engine(
    onnx_path: str | Path,
    version_dir: str | Path,
    max_batch_size: int,
    opt_batch_size: int | None = None,
    fp16: bool = False,
) -> Path:
    """Build ``model.sm<cc>.trt<ver>.plan`` in ``version_dir`` for this GPU, its optimization profile
    covering batch 1..max_batch_size, and record the ONNX it came from."""
    onnx_path, version_dir = Path(onnx_path), Path(version_dir)
    cc, gpu = _gpu()
    opt = opt_batch_size or max(1, max_batch_size // 2)
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
    trtexec = shutil.which("trtexec")
    if trt is None and trtexec is None:
        raise TensorRTUnavailableError(
            f"TensorRT is not installed: `pip install tensorrt=={SERVED_TENSORRT}.*` (the serving Triton's) or "
            "run this inside the Triton container, which ships trtexec"
        )
    version = trt.__version__ if trt is not None else _trtexec_version(trtexec)
    check_tensorrt_version(version)
    plan = version_dir / plan_name(cc)
    fd, tmp = tempfile.mkstemp(dir=version_dir, prefix=f".{plan.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if trt is not None:
            _build_with_api(trt, onnx_path, Path(tmp), max_batch_size, opt, fp16)
        else:
            _build_with_trtexec(trtexec, onnx_path, Path(tmp), max_batch_size, opt, fp16)
        os.replace(tmp, plan)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    write_record(plan, sha256_file(onnx_path), ".".join(version.split(".")[:2]), cc, gpu)
    return plan


def _build_with_api(trt, onnx_path: Path, plan_path: Path, max_bs: int, opt: int, fp16: bool) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise StepFailedError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls/convolutions would miss the GPU profile's tolerance
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    shape = tuple(inp.shape[1:])
    profile.set_shape(inp.name, (1, *shape), (opt, *shape), (max_bs, *shape))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise StepFailedError(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path.write_bytes(bytes(engine))


def _build_with_trtexec(trtexec: str, onnx_path: Path, plan_path: Path, max_bs: int, opt: int, fp16: bool) -> None:
    import onnx

    inp = onnx.load(str(onnx_path), load_external_data=False).graph.input[0]
    dims = "x".join(str(d.dim_value) for d in inp.type.tensor_type.shape.dim[1:])
    cmd = [
        trtexec,
        f"--onnx={onnx_path}",
        f"--saveEngine={plan_path}",
        f"--minShapes={inp.name}:1x{dims}",
        f"--optShapes={inp.name}:{opt}x{dims}",
        f"--maxShapes={inp.name}:{max_bs}x{dims}",
        "--noTF32",
    ] + (["--fp16"] if fp16 else [])
    subprocess.run(cmd, check=True)
