"""Split a trained model, export both halves to ONNX (dynamic batch), and build TensorRT engines.

``export_split`` writes into one directory (the "export"):
  head.onnx, tail.onnx   the halves; input INPUT (N,3,H,W) -> FEATURES (N,...) -> LOGITS (N,K)
  model.onnx             the unsplit model (INPUT -> LOGITS), the unprotected serving baseline
  split.json             layer, shapes, sha256 of each file, the equivalence errors measured
With a second layer (multi-layer repair) the model is cut twice: head.onnx ends after ``layer``,
mid.onnx (FEATURES -> FEATURES2) after ``layer2``, and tail.onnx starts from there.
``build_tensorrt_engine`` turns an ONNX half into ``.plan`` on a GPU machine (TensorRT Python API, or
``trtexec`` when only that is installed); without TensorRT or a GPU it fails with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fire_backend.checkpoint import load_model
from fire_backend.data import load_dataset, to_tensor_batch
from fire_backend.split import check_equivalence, split_at

INPUT, FEATURES, FEATURES2, LOGITS = "INPUT", "FEATURES", "FEATURES2", "LOGITS"
ONNX_OPSET = 17


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ExportInfo:
    """What ``split.json`` records; later steps read it instead of reaching into the model."""

    layer: str
    dataset: str
    input_shape: list[int]  # without the batch axis
    feature_shape: list[int]
    num_classes: int
    head_sha256: str
    tail_sha256: str
    split_max_abs_err: float
    onnx_max_abs_err: float
    attack: dict
    layer2: str | None = None  # multi-layer: the second cut, after ``layer``
    feature2_shape: list[int] | None = None  # the features at layer2 (tail.onnx's input)
    mid_sha256: str | None = None  # mid.onnx: features at layer -> features at layer2

    @property
    def multilayer(self) -> bool:
        return self.layer2 is not None

    @classmethod
    def read(cls, export_dir: str | Path) -> ExportInfo:
        path = Path(export_dir) / "split.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `fire export` first")
        return cls(**json.loads(path.read_text()))


def onnx_export(module: nn.Module, example: torch.Tensor, path: Path, in_name: str, out_name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but exact and dependency-free
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[in_name],
            output_names=[out_name],
            dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
        )


def onnx_session(path: str | Path, threads: int = 1):
    """An onnxruntime CPU session with a fixed thread budget (several run side by side on 2 cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_split(
    model_dir: str | Path, layer: str, out_dir: str | Path, n_check: int = 256, layer2: str | None = None
) -> ExportInfo:
    """Split the model in ``model_dir`` after ``layer`` (and ``layer2``); write the ONNX parts and split.json."""
    model, meta = load_model(model_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = split_at(model, layer, keep=(layer2,) if layer2 else ())
    test = load_dataset(meta["dataset"], "test").subset(n_check, seed=0)
    x = torch.from_numpy(to_tensor_batch(test.images))
    split_err = check_equivalence(model, split, x, atol=1e-5)
    parts = [(split.head, INPUT, FEATURES, "head.onnx")]
    if layer2:
        second = split_at(split.tail, layer2)
        parts += [(second.head, FEATURES, FEATURES2, "mid.onnx"), (second.tail, FEATURES2, LOGITS, "tail.onnx")]
    else:
        parts.append((split.tail, FEATURES, LOGITS, "tail.onnx"))
    with torch.no_grad():  # not inference_mode: the ONNX exporter re-traces with these tensors
        logits = model(x)
        onnx_export(model, x[:2], out_dir / "model.onnx", INPUT, LOGITS)  # the unsplit model: serving baseline
        h, onnx_h, outputs = x, x.numpy(), []
        for module, in_name, out_name, filename in parts:
            onnx_export(module, h[:2], out_dir / filename, in_name, out_name)
            h = module(h)
            onnx_h = onnx_session(out_dir / filename).run(None, {in_name: onnx_h})[0]
            outputs.append((h, onnx_h))
    whole_logits = onnx_session(out_dir / "model.onnx").run(None, {INPUT: x.numpy()})[0]
    errors = [np.abs(o - t.numpy()).max() for t, o in outputs] + [np.abs(whole_logits - logits.numpy()).max()]
    errors.append(np.abs(outputs[-1][0].numpy() - logits.numpy()).max())
    onnx_err = float(max(errors))
    if onnx_err > 1e-4:
        raise RuntimeError(f"ONNX export differs from torch by {onnx_err:.3g} (> 1e-4)")
    info = ExportInfo(
        layer=layer,
        dataset=meta["dataset"],
        input_shape=list(x.shape[1:]),
        feature_shape=list(outputs[0][0].shape[1:]),
        num_classes=int(logits.shape[1]),
        head_sha256=sha256_file(out_dir / "head.onnx"),
        tail_sha256=sha256_file(out_dir / "tail.onnx"),
        split_max_abs_err=split_err,
        onnx_max_abs_err=onnx_err,
        attack=meta["attack"],
        layer2=layer2,
        feature2_shape=list(outputs[1][0].shape[1:]) if layer2 else None,
        mid_sha256=sha256_file(out_dir / "mid.onnx") if layer2 else None,
    )
    (out_dir / "split.json").write_text(json.dumps(asdict(info), indent=2) + "\n")
    return info


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
