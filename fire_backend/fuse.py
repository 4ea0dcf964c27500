"""FIRE fused: fold the repair into one ONNX graph, head -> repair -> tail, served as a single model.

The zero-overhead option for deployments that do not need hot-swappable directions: ``beta``, ``mu`` and
the threshold become constants of the graph. Built from the files earlier steps wrote (head.onnx,
tail.onnx, the direction file): the repair is exported from torch on its own, and the three graphs are
stitched by renaming their internal tensors apart.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from fire_backend.directions import DirectionFile
from fire_backend.export import FEATURES, INPUT, LOGITS, ExportInfo, onnx_export

REPAIRED = "REPAIRED"


class RepairGraph(nn.Module):
    """The three repair modes as traceable torch ops (``repair.Repair`` is the in-place serving form)."""

    def __init__(self, d: DirectionFile, mode: str | None = None):
        super().__init__()
        self.mode = mode or d.mode
        self.feature_shape = tuple(d.feature_shape)
        beta = d.beta.reshape(-1).float()
        unit = beta / beta.norm()
        self.register_buffer("shift", d.alpha * beta)
        self.register_buffer("unit", unit)
        self.register_buffer("mu_dot_unit", (d.mu.reshape(-1).float() @ unit).reshape(1))
        self.register_buffer("threshold", torch.tensor([d.threshold], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        if self.mode == "subtract":
            out = flat - self.shift
        else:
            s = flat @ self.unit - self.mu_dot_unit
            if self.mode == "project":
                out = flat - torch.relu(s)[:, None] * self.unit
            else:
                out = flat - (s > self.threshold).to(flat.dtype)[:, None] * self.shift
        # A constant target shape keeps (C, H, W) static for the tail: with reshape(x.shape) onnxruntime
        # loses them and its layout optimizations, costing ~15 % of the fused model's time.
        return out.reshape(-1, *self.feature_shape)


def _prefixed(graph: onnx.GraphProto, prefix: str, keep: dict[str, str]) -> onnx.GraphProto:
    """A copy of ``graph`` with every tensor and node name prefixed, except those in ``keep`` (renamed)."""
    g = onnx.GraphProto()
    g.CopyFrom(graph)

    def rename(name: str) -> str:
        return name if name == "" else keep.get(name, prefix + name)

    for node in g.node:
        node.name = prefix + node.name
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for coll in (g.initializer, g.input, g.output, g.value_info):
        for item in coll:
            item.name = rename(item.name)
    return g


def _export_repair(d: DirectionFile, mode: str | None, path: Path) -> onnx.ModelProto:
    onnx_export(RepairGraph(d, mode), torch.zeros(2, *d.feature_shape), path, FEATURES, REPAIRED)
    return onnx.load(str(path))


def build_fused_onnx(
    export_dir: str | Path, directions: str | Path, out_path: str | Path, mode: str | None = None
) -> Path:
    """Write ``out_path``: INPUT -> head -> repair -> tail -> LOGITS as one ONNX model."""
    export_dir, out_path = Path(export_dir), Path(out_path)
    info = ExportInfo.read(export_dir)
    d = DirectionFile.load(directions, feature_shape=tuple(info.feature_shape), head_sha256=info.head_sha256)
    head = onnx.load(str(export_dir / "head.onnx"))
    tail = onnx.load(str(export_dir / "tail.onnx"))
    repair = _export_repair(d, mode, out_path.with_suffix(".repair.onnx"))
    out_path.with_suffix(".repair.onnx").unlink()
    parts = [
        _prefixed(head.graph, "head/", {INPUT: INPUT, FEATURES: "features"}),
        _prefixed(repair.graph, "fire/", {FEATURES: "features", REPAIRED: "repaired"}),
        _prefixed(tail.graph, "tail/", {FEATURES: "repaired", LOGITS: LOGITS}),
    ]
    graph = onnx.helper.make_graph(
        nodes=[n for p in parts for n in p.node],
        name="fire_fused",
        inputs=list(parts[0].input),
        outputs=list(parts[2].output),
        initializer=[t for p in parts for t in p.initializer],
        value_info=[v for p in parts for v in p.value_info],
    )
    model = onnx.helper.make_model(graph, opset_imports=head.opset_import, producer_name="fire")
    model.ir_version = head.ir_version
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return out_path
