"""Cut an ONNX model in two at a tensor, by graph extraction (no torch needed).

A tensor is a valid cut when all of the graph's data flows through it: the head is the tensor with
everything it depends on, the tail is everything else, and the only data-dependent tensor the tail
reads from the head is the cut itself (constants, initializers and nodes that do not depend on the
input may be used on both sides; ``onnx.utils.Extractor`` copies them into each half).

``OnnxGraph(path).cuts()`` lists the valid cuts in topological order with their shapes;
``split(cut, out_dir)`` writes head.onnx / tail.onnx with the cut tensor renamed to ``FEATURES``, the
original opset, and the original input and output names and dynamic axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import shape_inference

from fire_backend.errors import FireError
from fire_backend.names import FEATURES

ONNX_DTYPES = {  # ONNX tensor element type -> numpy dtype name (the ones FIRE serves)
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
}
MIN_OPSET = 7  # below this onnxruntime, shape inference and the extractor are unreliable


class OnnxModelError(FireError, ValueError):
    """The ONNX model cannot be split as asked; the message names the file and what to do."""


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: name, dims (None or a name where symbolic, batch first), dtype."""

    name: str
    dims: tuple
    dtype: str


@dataclass(frozen=True)
class Cut:
    tensor: str
    dims: tuple  # as shape inference sees it, batch first
    node: str  # the producing node's name
    op: str
    position: int  # index of the producing node in topological order

    @property
    def label(self) -> str:
        return f"{self.node or '(unnamed)'} [{self.op}]"


def _dims(value_info: onnx.ValueInfoProto) -> tuple:
    shape = value_info.type.tensor_type.shape
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim)


def _tensor_info(value_info: onnx.ValueInfoProto, path: Path) -> TensorInfo:
    elem = value_info.type.tensor_type.elem_type
    if elem not in ONNX_DTYPES:
        name = onnx.TensorProto.DataType.Name(elem)
        served = sorted(ONNX_DTYPES.values())
        raise OnnxModelError(f"{path}: tensor {value_info.name!r} has type {name}; FIRE serves {served}")
    return TensorInfo(value_info.name, _dims(value_info), ONNX_DTYPES[elem])


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names a node's subgraphs (If, Loop, Scan bodies) read implicitly."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            produced = {o for n in g.node for o in n.output}
            produced |= {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                names |= {i for i in n.input if i and i not in produced} | (_subgraph_inputs(n) - produced)
    return names


class OnnxGraph:
    """One ONNX model with a single input and a single output, shape-inferred, ready to be cut.

    ``input_dims`` (batch first; None where it stays as the model has it) fixes the input's symbolic
    dims to the size the model is served at, so that shapes propagate through data-dependent ops (a
    Reshape computed from the input's shape): the halves are then cut for that size."""

    def __init__(self, path: str | Path, input_dims: tuple | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxModelError(f"{self.path}: no such file")
        try:
            model = onnx.load(str(self.path))
        except Exception as e:  # noqa: BLE001 - protobuf / IO errors alike
            raise OnnxModelError(f"{self.path}: not a readable ONNX model ({e})") from None
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < MIN_OPSET:
            raise OnnxModelError(f"{self.path}: opset {opset} is too old to split; re-export with opset >= {MIN_OPSET}")
        if input_dims:
            _fix_input_dims(model, input_dims)
        try:
            self.model = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception as e:  # noqa: BLE001
            raise OnnxModelError(
                f"{self.path}: ONNX shape inference failed ({e}); an op or opset FIRE cannot split"
            ) from None
        g = self.model.graph
        constants = {t.name for t in g.initializer}
        inputs = [i for i in g.input if i.name not in constants]
        if len(inputs) != 1 or len(g.output) != 1:
            raise OnnxModelError(
                f"{self.path}: FIRE protects classifiers with one input and one output; this model has inputs "
                f"{[i.name for i in inputs]} and outputs {[o.name for o in g.output]}. Export the classifier "
                "alone (one image tensor in, one logits tensor out)."
            )
        self.input, self.output = _tensor_info(inputs[0], self.path), _tensor_info(g.output[0], self.path)
        self.opset = opset
        self.nodes = list(g.node)
        self._value_info = {v.name: v for v in [*g.value_info, *g.input, *g.output]}
        self._analyse(constants)

    def _analyse(self, constants: set[str]) -> None:
        """Per node: its data inputs' producers, and its ancestors as a bit set (nodes are topologically
        sorted in a valid ONNX graph)."""
        producer: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for out in node.output:
                producer[out] = i
        self.producer = producer
        self.ancestors: list[int] = []
        self.data_inputs: list[list[str]] = []  # inputs that depend on the graph input
        dependent = {self.input.name}
        for i, node in enumerate(self.nodes):
            reads = [n for n in [*node.input, *_subgraph_inputs(node)] if n and n not in constants]
            mask = 0
            for name in reads:
                if name in producer:
                    p = producer[name]
                    if p >= i:
                        raise OnnxModelError(f"{self.path}: nodes are not topologically sorted; re-save the model")
                    mask |= self.ancestors[p] | (1 << p)
            self.ancestors.append(mask)
            data = [n for n in reads if n in dependent]
            self.data_inputs.append(data)
            if data:
                dependent.update(o for o in node.output if o)

    def _crossing(self, tensor: str) -> list[str]:
        """Data-dependent tensors other than ``tensor`` that the tail would need from the head."""
        i = self.producer[tensor]
        head = self.ancestors[i] | (1 << i)
        crossing = set()
        for j, inputs in enumerate(self.data_inputs):
            if head >> j & 1:
                continue
            for name in inputs:
                if name == self.input.name or (name in self.producer and head >> self.producer[name] & 1):
                    crossing.add(name)
        if self.output.name in self.producer and head >> self.producer[self.output.name] & 1:
            crossing.add(self.output.name)
        crossing.discard(tensor)
        return sorted(crossing)

    def _cut(self, tensor: str) -> Cut:
        i = self.producer[tensor]
        vi = self._value_info.get(tensor)
        return Cut(tensor, _dims(vi) if vi is not None else (), self.nodes[i].name, self.nodes[i].op_type, i)

    def cuts(self) -> list[Cut]:
        """Every valid single-tensor cut with a known shape, in topological order (the model's output
        excluded). Valid cuts whose shape shape inference could not find are in ``skipped``."""
        out, self.skipped = [], {}
        for node in self.nodes:
            for tensor in node.output:
                if not tensor or tensor == self.output.name or not self._depends_on_input(tensor):
                    continue
                if not self._is_float32(tensor):  # the repair edits float32 features
                    continue
                if self._crossing(tensor):
                    continue
                cut = self._cut(tensor)
                if _static(cut.dims):
                    out.append(cut)
                else:
                    where = "at this input size" if _static(self.input.dims) else "(declare the input size)"
                    self.skipped[tensor] = f"shape {cut.dims or 'unknown'}: not static {where}"
        return out

    def _is_float32(self, tensor: str) -> bool:
        vi = self._value_info.get(tensor)
        return vi is not None and vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    def _depends_on_input(self, tensor: str) -> bool:
        return bool(self.data_inputs[self.producer[tensor]])

    def check_cut(self, tensor: str) -> Cut:
        """The cut at ``tensor``, or an error naming the extra tensors and the valid cuts nearby."""
        if tensor not in self.producer or not self._depends_on_input(tensor) or tensor == self.output.name:
            problem = "is not a tensor computed from the input" if tensor != self.output.name else "is the output"
            raise OnnxModelError(f"{self.path}: {tensor!r} {problem}; {self._nearby(None)}")
        if not self._is_float32(tensor):
            raise OnnxModelError(f"{self.path}: {tensor!r} is not a float32 tensor; FIRE repairs float32 features. "
                                 f"{self._nearby(self.producer[tensor])}")  # fmt: skip
        crossing = self._crossing(tensor)
        if crossing:
            raise OnnxModelError(
                f"{self.path}: cutting at {tensor!r} would need {len(crossing) + 1} tensors to cross "
                f"({tensor}, {', '.join(crossing)}): only single-tensor cuts are possible (a skip connection "
                f"or a branch bypasses it). {self._nearby(self.producer[tensor])}"
            )
        cut = self._cut(tensor)
        if not _static(cut.dims):
            raise OnnxModelError(
                f"{self.path}: the shape of {tensor!r} is {cut.dims or 'unknown'} for the input {self.input.dims}; "
                "give the size the model is served at (--input-size HxW)"
            )
        return cut

    def _nearby(self, position: int | None, k: int = 3) -> str:
        cuts = self.cuts()
        if not cuts:
            return "this model has no single-tensor cut"
        if position is None:
            chosen = cuts[len(cuts) // 2 - k // 2 : len(cuts) // 2 - k // 2 + k] or cuts[:k]
        else:
            chosen = sorted(cuts, key=lambda c: abs(c.position - position))[: 2 * k]
            chosen.sort(key=lambda c: c.position)
        return "valid cuts nearby: " + ", ".join(f"{c.tensor!r} ({c.label})" for c in chosen) + " (see `fire layers`)"

    def split(self, tensor: str, out_dir: str | Path) -> tuple[Path, Path]:
        """Write head.onnx (input -> FEATURES) and tail.onnx (FEATURES -> output) into ``out_dir``."""
        from fire_backend.names import HEAD_ONNX, TAIL_ONNX

        self.check_cut(tensor)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        extractor = onnx.utils.Extractor(self.model)
        paths = []
        for part, (inputs, outputs), filename in (
            ("head", ([self.input.name], [tensor]), HEAD_ONNX),
            ("tail", ([tensor], [self.output.name]), TAIL_ONNX),
        ):
            try:
                sub = extractor.extract_model(inputs, outputs)
            except Exception as e:  # noqa: BLE001
                raise OnnxModelError(f"{self.path}: extracting the {part} at {tensor!r} failed ({e})") from None
            _rename(sub.graph, tensor, FEATURES)
            _dynamic_batch(sub.graph, FEATURES, self.input.dims[0] if self.input.dims else None)
            sub.ir_version = self.model.ir_version
            try:
                onnx.checker.check_model(sub)
            except onnx.checker.ValidationError as e:
                first = str(e).strip().splitlines()[0]
                raise OnnxModelError(
                    f"{self.path}: the {part} cut at {tensor!r} is not a valid model ({first})"
                ) from None
            onnx.save(sub, str(out_dir / filename))
            paths.append(out_dir / filename)
        return paths[0], paths[1]


def _static(dims: tuple) -> bool:
    """Every dim but the batch one known."""
    return len(dims) > 1 and all(isinstance(d, int) and d > 0 for d in dims[1:])


def _fix_input_dims(model: onnx.ModelProto, dims: tuple) -> None:
    constants = {t.name for t in model.graph.initializer}
    (inp,) = [i for i in model.graph.input if i.name not in constants][:1] or [None]
    if inp is None or len(inp.type.tensor_type.shape.dim) != len(dims):
        return
    for d, value in zip(inp.type.tensor_type.shape.dim, dims, strict=True):
        if value and not d.HasField("dim_value"):
            d.ClearField("dim_param")
            d.dim_value = int(value)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for coll in (graph.input, graph.output, graph.value_info):
        for v in coll:
            if v.name == old:
                v.name = new


def _dynamic_batch(graph: onnx.GraphProto, tensor: str, batch) -> None:
    """Give the cut tensor the model input's batch dimension (a name where the input's is symbolic)."""
    for v in [*graph.input, *graph.output]:
        if v.name == tensor and v.type.tensor_type.shape.dim:
            d = v.type.tensor_type.shape.dim[0]
            if isinstance(batch, str):
                d.ClearField("dim_value")
                d.dim_param = batch
            elif batch is None:
                d.ClearField("dim_value")
                d.dim_param = "batch"
