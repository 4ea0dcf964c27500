"""FIRE fused and folded: head -> repair -> tail as one ONNX graph, served as a single model.

- fused (``build_fused_onnx``):
 the zero-overhead option for deployments that do not need hot-swappable directions:
  the repair's parameters become constants of the graph.
- folded (``build_folded_onnx``): the same graph with the repair's parameters as graph inputs
  (``names.FOLDED_INPUTS``, any number of directions: the rank axis is dynamic) and the first score as a second
  output: one onnxruntime session that the folded model feeds from the hot-reloaded direction file, so
  a swap changes inputs, not the session.
 Built from the files earlier steps wrote (head.onnx,
tail.onnx, the direction file): the repair is ``fire_backend.repair.RepairGraph`` (the same formula the
serving repair computes) exported from torch on its own, and the three graphs are stitched by renaming
their internal tensors apart.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from fire_backend.directions import DirectionFile
from fire_backend.errors import InvalidInputError
from fire_backend.names import (
    FEATURES,
    FEATURES2,
    FOLDED_INPUTS,
    FOLDED_PER_DIRECTION,
    FOLDED_SCORE,
    HEAD_ONNX,
    MID_ONNX,
    REPAIRED,
    TAIL_ONNX,
)
from fire_backend.repair import RepairGraph, RepairInputsGraph
from modelio.export import ONNX_OPSET, ExportInfo, onnx_export


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


REPAIR_MIN_OPSET = 9  # the oldest opset the repair graph is exported at (the TorchScript exporter's base)


def repair_opset(head: onnx.ModelProto) -> int:
    """The opset the repair graph is exported at to join ``head``'s model: the model's own, so that the
    stitched graph declares the model's opset and every node of its halves means what it meant (a repair
    from a newer opset would not validate beside them: Reshape's ``allowzero`` is opset 14's), capped at
    ``ONNX_OPSET`` (the repair's ops have not changed since). A model older than ``REPAIR_MIN_OPSET`` is
    refused: its nodes under a newer opset could change meaning."""
    opset = next((o.version for o in head.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < REPAIR_MIN_OPSET:
        raise InvalidInputError(f"the model is ONNX opset {opset}: a fused or folded model needs opset >= "
                                f"{REPAIR_MIN_OPSET} (re-export it, or serve the ensemble)")  # fmt: skip
    return min(opset, ONNX_OPSET)


def _repair_graph(d: DirectionFile, mode: str | None, tmp: Path, opset: int = ONNX_OPSET) -> onnx.GraphProto:
    onnx_export(RepairGraph(d, mode), torch.zeros(2, *d.feature_shape), tmp, FEATURES, REPAIRED, opset)
    try:
        return onnx.load(str(tmp)).graph
    finally:
        tmp.unlink()


def build_fused_onnx(
    export_dir: str | Path, directions: str | Path | list, out_path: str | Path, mode: str | None = None
) -> Path:
    """Write ``out_path``: input -> head -> repair -> tail -> output as one ONNX model (the model's own
    input and output names); with a two-layer export and two direction files, input -> head -> repair ->
    mid -> repair 2 -> tail -> output."""
    export_dir, out_path = Path(export_dir), Path(out_path)
    info = ExportInfo.read(export_dir)
    files = [directions] if isinstance(directions, str | Path) else list(directions)
    cuts = [(info.feature_shape, info.head_sha256)] + ([(info.feature2_shape, info.mid_sha256)] * info.multilayer)
    if len(files) != len(cuts):
        raise InvalidInputError(
            f"{export_dir} is cut {len(cuts)} time(s): give as many direction files, not {len(files)}"
        )
    head = onnx.load(str(export_dir / HEAD_ONNX))
    opset = repair_opset(head)
    # (graph, its input, its output), in the order the ensemble runs them
    chain = [(head.graph, info.input_name, FEATURES)]
    halves = [onnx.load(str(export_dir / MID_ONNX)).graph] if info.multilayer else []
    halves.append(onnx.load(str(export_dir / TAIL_ONNX)).graph)
    for i, (path, (shape, producer_sha)) in enumerate(zip(files, cuts, strict=True)):
        d = DirectionFile.load(path, feature_shape=tuple(shape), head_sha256=producer_sha)
        chain.append((_repair_graph(d, mode, out_path.with_suffix(f".repair{i}.onnx"), opset), FEATURES, REPAIRED))
        last = i == len(cuts) - 1
        chain.append((halves[i], FEATURES if i == 0 else FEATURES2, info.output_name if last else FEATURES2))
    return _stitch(chain, head, out_path, "fire_fused")


def _stitch(chain: list, head: onnx.ModelProto, out_path: Path, name: str, shared: tuple[str, ...] = ()) -> Path:
    """``chain`` of (graph, its input, its output) joined output to input; ``shared`` tensor names keep
    their names (extra graph inputs and outputs of a step: they become the whole graph's)."""
    parts = []
    for i, (graph, inp, out) in enumerate(chain):
        keep = {inp: inp if i == 0 else f"t{i - 1}", out: out if i == len(chain) - 1 else f"t{i}"}
        parts.append(_prefixed(graph, f"s{i}/", {**keep, **{s: s for s in shared}}))
    inputs = list(parts[0].input) + [i for p in parts[1:] for i in p.input if i.name in shared]
    outputs = list(parts[-1].output) + [o for p in parts[:-1] for o in p.output if o.name in shared]
    # Each joint keeps the type its consumer declares (e.g. ["batch", 32, 16, 16]): onnxruntime cannot tell
    # that the repair's reshape(-1, ...) has the batch of the tensor it came from, and without that it does
    # not fuse the tail's residual Add and ReLU into its convolution (tests/test_fuse.py counts the nodes).
    joints = {f"t{i}" for i in range(len(parts) - 1)}
    declared = [i for p in parts[1:] for i in p.input if i.name in joints]
    graph = onnx.helper.make_graph(
        nodes=[n for p in parts for n in p.node],
        name=name,
        inputs=inputs,
        outputs=outputs,
        initializer=[t for p in parts for t in p.initializer],
        value_info=[v for p in parts for v in p.value_info if v.name not in joints] + declared,
    )
    model = onnx.helper.make_model(graph, opset_imports=head.opset_import, producer_name="fire")
    model.ir_version = head.ir_version
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return out_path


def build_folded_onnx(export_dir: str | Path, out_path: str | Path) -> Path:
    """Write ``out_path``: the model's input and the repair's parameters -> head -> repair -> tail -> the
    model's output and the first score (single-layer exports)."""
    export_dir, out_path = Path(export_dir), Path(out_path)
    info = ExportInfo.read(export_dir)
    if info.multilayer:
        raise InvalidInputError(f"{export_dir}: a folded model serves single-layer exports only")
    head = onnx.load(str(export_dir / HEAD_ONNX))
    tmp = out_path.with_suffix(".repair.onnx")
    export_repair_inputs_graph(tuple(info.feature_shape), tmp, repair_opset(head))
    try:
        repair = onnx.load(str(tmp)).graph
    finally:
        tmp.unlink()
    chain = [(head.graph, info.input_name, FEATURES), (repair, FEATURES, REPAIRED),
             (onnx.load(str(export_dir / TAIL_ONNX)).graph, FEATURES, info.output_name)]  # fmt: skip
    return _stitch(chain, head, out_path, "fire_folded", shared=(*FOLDED_INPUTS, FOLDED_SCORE))


def export_repair_inputs_graph(feature_shape: tuple[int, ...], path: Path, opset: int = ONNX_OPSET) -> None:
    """Write the folded model's repair step, ``RepairInputsGraph``, to ``path``: the features and the
    parameters in (dynamic batch and rank axes), the repaired features and the first score out."""
    d = int(np.prod(feature_shape))
    example = (torch.zeros(2, *feature_shape), torch.zeros(3, d), torch.zeros(3), torch.zeros(3), torch.zeros(3),
               torch.zeros(1), torch.zeros(3, d))  # fmt: skip
    axes = {FEATURES: {0: "batch"}, REPAIRED: {0: "batch"}, FOLDED_SCORE: {0: "batch"},
            **{name: {0: "rank"} for name in FOLDED_PER_DIRECTION}}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but exact and dependency-free
        torch.onnx.export(RepairInputsGraph(feature_shape), example, str(path), dynamo=False,
                          opset_version=opset, input_names=[FEATURES, *FOLDED_INPUTS],
                          output_names=[REPAIRED, FOLDED_SCORE], dynamic_axes=axes)  # fmt: skip
