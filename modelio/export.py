"""Split a trained model, export both halves to ONNX (dynamic batch), and build TensorRT engines.

``export_split`` writes into one directory (the "export"):
  head.onnx, tail.onnx   the halves; input INPUT (N,3,H,W) -> FEATURES (N,...) -> LOGITS (N,K)
  model.onnx             the unsplit model (INPUT -> LOGITS), the unprotected serving baseline
  split.json             layer, shapes, sha256 of each file, the equivalence errors measured
With a second layer (multi-layer repair) the model is cut twice: head.onnx ends after ``layer``,
mid.onnx (FEATURES -> FEATURES2) after ``layer2``, and tail.onnx starts from there.
TensorRT engines are built from these files by ``modelio.tensorrt`` on the GPU machine.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fire_backend.files import sha256_file
from fire_backend.names import FEATURES, FEATURES2, INPUT, LOGITS, SPLIT_JSON
from fire_backend.onnx_runtime import onnx_session
from modelio.split import check_equivalence, split_at
from zoo.checkpoint import load_model
from zoo.data import load_dataset, to_tensor_batch

ONNX_OPSET = 17


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
        path = Path(export_dir) / SPLIT_JSON
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
    (out_dir / SPLIT_JSON).write_text(json.dumps(asdict(info), indent=2) + "\n")
    return info
