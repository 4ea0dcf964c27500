"""TensorRT engines for the GPU profile, built from the exported ONNX files on the GPU machine.

``build_tensorrt_engine`` uses the TensorRT Python API, or ``trtexec`` when only that is installed;
without TensorRT or a GPU it fails with a clear message.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch


class TensorRTUnavailableError(RuntimeError):
    """TensorRT or a CUDA GPU is missing; engines can only be built on a GPU machine."""


def _gpu_present() -> bool:
    return torch.cuda.is_available() or Path("/dev/nvidia0").exists()


def build_tensorrt_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    max_batch_size: int,
    opt_batch_size: int | None = None,
    fp16: bool = False,
) -> Path:
    """Build a TensorRT engine whose optimization profile covers batch 1..max_batch_size.

    Build it with the TensorRT version of the serving Triton (24.10 / server 2.51: TensorRT 10.5), e.g.
    inside the Triton container: engines are not portable across TensorRT versions or GPU models.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not _gpu_present():
        raise TensorRTUnavailableError(
            f"cannot build {plan_path.name}: no CUDA GPU is visible on this machine. TensorRT engines are "
            "built on the GPU machine that serves them; the CPU profile needs no engine."
        )
    opt = opt_batch_size or max(1, max_batch_size // 2)
    try:
        import tensorrt as trt
    except ImportError:
        trtexec = shutil.which("trtexec")
        if trtexec is None:
            raise TensorRTUnavailableError(
                "TensorRT is not installed: `pip install tensorrt` (same major.minor as the server's) or run "
                "this inside the Triton container, which ships trtexec"
            ) from None
        return _build_with_trtexec(trtexec, onnx_path, plan_path, max_batch_size, opt, fp16)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    shape = tuple(inp.shape[1:])
    profile.set_shape(inp.name, (1, *shape), (opt, *shape), (max_batch_size, *shape))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path.write_bytes(bytes(engine))
    return plan_path


def _build_with_trtexec(trtexec: str, onnx_path: Path, plan_path: Path, max_bs: int, opt: int, fp16: bool) -> Path:
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
    ] + (["--fp16"] if fp16 else [])
    subprocess.run(cmd, check=True)
    return plan_path
