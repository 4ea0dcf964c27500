"""Split a model, export both halves to ONNX (dynamic batch), and record what later steps need.

Every source ends in the same export directory:
  head.onnx, tail.onnx   the halves: the model's input -> FEATURES (N, ...) -> the model's output
  model.onnx             the unsplit model, the unprotected serving baseline
  split.json             the cut, the input/output names, dtypes and shapes, the preprocessing, the
                         sha256 of each file and the equivalence errors measured on real inputs
Sources:
  ``export_onnx_model``  an ONNX file, cut at a tensor by graph extraction (no torch needed)
  ``export_torch_model`` an ``nn.Module``, cut after a sub-module with torch.fx, halves exported to ONNX
  ``export_split``       a zoo model directory (``fire train``), with its dataset's test images as checks;
                         it can cut twice (multi-layer: head.onnx -> mid.onnx (FEATURES -> FEATURES2) -> tail.onnx)
TensorRT engines are built from these files by ``modelio.tensorrt`` on the GPU machine.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fire_backend.errors import FireError, InvalidInputError, MissingFileError
from fire_backend.files import sha256_file
from fire_backend.names import (
    FEATURES,
    FEATURES2,
    HEAD_ONNX,
    INPUT,
    LOGITS,
    MID_ONNX,
    SPLIT_JSON,
    TAIL_ONNX,
    TORCHSCRIPT,
    WHOLE_ONNX,
)
from fire_backend.onnx_runtime import onnx_session
from modelio.onnx_graph import OnnxGraph
from modelio.preprocess import Preprocess
from modelio.split import check_equivalence, split_at

ONNX_OPSET = 17
SPLIT_TOLERANCE = 1e-5  # head(tail(x)) vs the original, same runtime
EXPORT_TOLERANCE = 1e-4  # ONNX vs torch


class ExportError(FireError, RuntimeError):
    """The halves do not reproduce the model; the message gives the measured error."""


@dataclass
class ExportInfo:
    """What ``split.json`` records; later steps read it instead of reaching into the model."""

    layer: str  # the cut: a sub-module name (torch) or a tensor name (ONNX)
    dataset: str  # the zoo dataset, "" for a user's model
    input_shape: list[int]  # without the batch axis
    feature_shape: list[int]
    num_classes: int
    head_sha256: str
    tail_sha256: str
    split_max_abs_err: float
    onnx_max_abs_err: float
    attack: dict  # the zoo attack the model carries, {} for a user's model
    layer2: str | None = None  # multi-layer: the second cut, after ``layer``
    feature2_shape: list[int] | None = None  # the features at layer2 (tail.onnx's input)
    mid_sha256: str | None = None  # mid.onnx: features at layer -> features at layer2
    input_name: str = INPUT
    input_dtype: str = "float32"
    output_name: str = LOGITS
    output_shape: list[int] | None = None  # without the batch axis; None: [num_classes]
    preprocess: dict = field(default_factory=dict)  # Preprocess.as_dict()
    source: dict = field(default_factory=dict)  # where the model came from
    labels: list[str] = field(default_factory=list)  # class names, if known (served as the label file)
    torchscript: dict = field(default_factory=dict)  # ONNX file -> sha256 of the same part as TorchScript
    # (exports from torch only: the gpu_torch profile runs these)

    @property
    def multilayer(self) -> bool:
        return self.layer2 is not None

    def preprocessing(self) -> Preprocess:
        if self.preprocess:
            return Preprocess.from_dict(self.preprocess)
        _, h, w = self.input_shape  # exports written before preprocessing was recorded: zoo pixels in [0, 1]
        return Preprocess(h, w)

    @classmethod
    def read(cls, export_dir: str | Path) -> ExportInfo:
        path = Path(export_dir) / SPLIT_JSON
        if not path.is_file():
            raise MissingFileError(f"{path} not found: run `fire export` first")
        return cls(**json.loads(path.read_text()))

    def write(self, export_dir: str | Path) -> None:
        (Path(export_dir) / SPLIT_JSON).write_text(json.dumps(asdict(self), indent=2) + "\n")


def onnx_export(module: nn.Module, example: torch.Tensor, path: Path, in_name: str, out_name: str,
                opset: int = ONNX_OPSET) -> None:  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but exact and dependency-free
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[in_name],
            output_names=[out_name],
            dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
        )


def torchscript_export(module: nn.Module, example: torch.Tensor, path: Path, checks: torch.Tensor) -> float:
    """``module`` traced to TorchScript (Triton's own PyTorch format, stable across torch versions) at
    ``path``; the largest difference from the module on ``checks`` (another batch size than the trace's,
    so a batch baked into the trace shows)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export, whose files
        traced = torch.jit.trace(module, example, check_trace=False)  # do not load across torch versions
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path))
    return float((loaded(checks) - module(checks)).abs().max())


def _check_inputs(preprocess: Preprocess, images: np.ndarray | None, n: int = 64, seed: int = 0) -> np.ndarray:
    """The model inputs equivalence is checked on: the given images, else random pixel images."""
    if images is None:
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, size=(n, preprocess.height, preprocess.width, 3), dtype=np.uint8)
    return preprocess.apply(images[:n])


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = onnx_session(path, threads=2)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def export_onnx_model(
    onnx_path: str | Path,
    cut: str,
    out_dir: str | Path,
    preprocess: Preprocess,
    check_images: np.ndarray | None = None,
    source: dict | None = None,
) -> ExportInfo:
    """Cut an ONNX model at tensor ``cut``; check head -> tail == the original with onnxruntime."""
    out_dir = Path(out_dir)
    graph = OnnxGraph(onnx_path, input_dims=(None, *preprocess.dims))  # halves cut for the served size
    preprocess.check_fits(graph.input.dims, graph.input.dtype, str(onnx_path))
    head, tail = graph.split(cut, out_dir)
    shutil.copyfile(onnx_path, out_dir / WHOLE_ONNX)
    x = _check_inputs(preprocess, check_images)
    whole, features = _run(out_dir / WHOLE_ONNX, x), _run(head, x)
    err = float(np.abs(_run(tail, features) - whole).max())
    if not err <= SPLIT_TOLERANCE:
        raise ExportError(f"{onnx_path}: head -> tail differs from the model by {err:.3g} (> {SPLIT_TOLERANCE})")
    info = ExportInfo(
        layer=cut,
        dataset="",
        input_shape=list(x.shape[1:]),
        feature_shape=list(features.shape[1:]),
        num_classes=int(np.prod(whole.shape[1:])),
        head_sha256=sha256_file(head),
        tail_sha256=sha256_file(tail),
        split_max_abs_err=err,
        onnx_max_abs_err=err,
        attack={},
        input_name=graph.input.name,
        input_dtype=graph.input.dtype,
        output_name=graph.output.name,
        output_shape=list(whole.shape[1:]),
        preprocess=preprocess.as_dict(),
        source=source or {"kind": "onnx", "path": str(onnx_path), "sha256": sha256_file(onnx_path)},
    )
    info.write(out_dir)
    return info


def export_torch_model(
    model: nn.Module,
    layer: str,
    out_dir: str | Path,
    preprocess: Preprocess,
    check_images: np.ndarray | None = None,
    layer2: str | None = None,
    source: dict | None = None,
    **extra,
) -> ExportInfo:
    """Cut ``model`` after sub-module ``layer`` (and ``layer2``) with torch.fx, export each part to ONNX,
    check the split in torch (1e-5) and the ONNX files against torch (1e-4)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    split = split_at(model, layer, keep=(layer2,) if layer2 else ())
    x = torch.from_numpy(_check_inputs(preprocess, check_images, n=256))
    split_err = check_equivalence(model, split, x, atol=SPLIT_TOLERANCE)
    parts = [(split.head, INPUT, FEATURES, HEAD_ONNX)]
    if layer2:
        second = split_at(split.tail, layer2)
        parts += [(second.head, FEATURES, FEATURES2, MID_ONNX), (second.tail, FEATURES2, LOGITS, TAIL_ONNX)]
    else:
        parts.append((split.tail, FEATURES, LOGITS, TAIL_ONNX))
    with torch.no_grad():  # not inference_mode: the ONNX exporter re-traces with these tensors
        logits = model(x)
        onnx_export(model, x[:2], out_dir / WHOLE_ONNX, INPUT, LOGITS)  # the unsplit model: serving baseline
        ts_errors = [torchscript_export(model, x[:2], out_dir / TORCHSCRIPT[WHOLE_ONNX], x[:5])]
        h, onnx_h, outputs = x, x.numpy(), []
        for module, in_name, out_name, filename in parts:
            onnx_export(module, h[:2], out_dir / filename, in_name, out_name)
            ts_errors.append(torchscript_export(module, h[:2], out_dir / TORCHSCRIPT[filename], h[:5]))
            h = module(h)
            onnx_h = onnx_session(out_dir / filename).run(None, {in_name: onnx_h})[0]
            outputs.append((h, onnx_h))
    if max(ts_errors) > SPLIT_TOLERANCE:
        raise ExportError(f"TorchScript export differs from torch by {max(ts_errors):.3g} (> {SPLIT_TOLERANCE})")
    torchscript = {f: sha256_file(out_dir / TORCHSCRIPT[f]) for f in [WHOLE_ONNX] + [part[3] for part in parts]}
    errors = [np.abs(o - t.numpy()).max() for t, o in outputs]
    errors += [np.abs(_run(out_dir / WHOLE_ONNX, x.numpy()) - logits.numpy()).max()]
    errors.append(np.abs(outputs[-1][0].numpy() - logits.numpy()).max())
    onnx_err = float(max(errors))
    if onnx_err > EXPORT_TOLERANCE:
        raise ExportError(f"ONNX export differs from torch by {onnx_err:.3g} (> {EXPORT_TOLERANCE})")
    info = ExportInfo(
        layer=layer,
        dataset=extra.pop("dataset", ""),
        input_shape=list(x.shape[1:]),
        feature_shape=list(outputs[0][0].shape[1:]),
        num_classes=int(logits.shape[1]),
        head_sha256=sha256_file(out_dir / HEAD_ONNX),
        tail_sha256=sha256_file(out_dir / TAIL_ONNX),
        split_max_abs_err=split_err,
        onnx_max_abs_err=onnx_err,
        attack=extra.pop("attack", {}),
        layer2=layer2,
        feature2_shape=list(outputs[1][0].shape[1:]) if layer2 else None,
        mid_sha256=sha256_file(out_dir / MID_ONNX) if layer2 else None,
        input_dtype=preprocess.dtype,  # what the exported head takes (uint8 for raw pixels)
        preprocess=preprocess.as_dict(),
        source=source or {"kind": "torch"},
        labels=list(extra.pop("labels", [])),
        torchscript=torchscript,
    )
    info.write(out_dir)
    return info


PIXEL_INPUTS = ("float", "uint8")  # a zoo export's input: float NCHW in [0, 1], or raw uint8 NHWC pixels


def export_split(
    model_dir: str | Path, layer: str, out_dir: str | Path, n_check: int = 256, layer2: str | None = None,
    pixels: str = "float",
) -> ExportInfo:  # fmt: skip
    """Split the zoo model in ``model_dir`` after ``layer`` (and ``layer2``), checked on its test images.

    ``pixels``: "float" (NCHW in [0, 1], what the network was trained on) or "uint8" (raw NHWC pixels,
    what image files decode to and stock image clients send: the conversion moves into the head)."""
    from zoo.checkpoint import load_model
    from zoo.data import class_names, load_dataset
    from zoo.models import PixelInput

    if pixels not in PIXEL_INPUTS:
        raise InvalidInputError(f"pixels must be one of {PIXEL_INPUTS}, got {pixels!r}")
    model, meta = load_model(model_dir)
    test = load_dataset(meta["dataset"], "test").subset(n_check, seed=0)
    size = test.images.shape[1:3]
    if pixels == "uint8":
        model.normalize = PixelInput(model.normalize)
        preprocess = Preprocess(*size, layout="NHWC", dtype="uint8")
    else:
        preprocess = Preprocess(*size)  # zoo models normalise inside: pixels in [0, 1]
    return export_torch_model(
        model, layer, out_dir, preprocess, test.images, layer2, source={"kind": "zoo", "path": str(model_dir)},
        dataset=meta["dataset"], attack=meta["attack"], labels=class_names(meta["dataset"]),
    )  # fmt: skip
