"""Cut an ``nn.Module`` after a named sub-module into a head and a tail.

The model is traced with ``torch.fx``, treating the named sub-module as one opaque call. The cut is
legal only when exactly one tensor crosses it (the sub-module's output); a cut inside a residual block,
where the skip connection would also cross, is refused with the names of the extra tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from fire_backend.errors import FireError


class SplitError(FireError, ValueError):
    """The requested cut is not possible; the message says why and which layers would work."""


@dataclass
class SplitModel:
    head: fx.GraphModule
    tail: fx.GraphModule
    layer: str


class _CutTracer(fx.Tracer):
    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def candidate_layers(model: nn.Module) -> list[str]:
    """Top-level children, in order: the usual places to cut."""
    return [name for name, _ in model.named_children()]


def split_at(model: nn.Module, layer: str, keep: tuple[str, ...] = ()) -> SplitModel:
    """Split ``model`` right after sub-module ``layer`` (its qualified name, e.g. ``layer2``).

    ``keep``: other sub-modules to keep as single calls, so the tail can be cut again after them."""
    names = dict(model.named_modules())
    if layer not in names or layer == "":
        raise SplitError(f"no sub-module named {layer!r}; top-level children: {candidate_layers(model)}")
    graph = _CutTracer({layer, *keep}).trace(model)
    nodes = list(graph.nodes)
    cut = [n for n in nodes if n.op == "call_module" and n.target == layer]
    if len(cut) != 1:
        raise SplitError(f"sub-module {layer!r} is called {len(cut)} times in forward(); need exactly once")
    cut_node = cut[0]
    head_nodes = nodes[: nodes.index(cut_node) + 1]
    head_set = set(head_nodes)
    crossing = {arg for n in nodes[len(head_nodes) :] for arg in n.all_input_nodes if arg in head_set}
    extra = sorted(n.name for n in crossing if n is not cut_node)
    if extra:
        raise SplitError(
            f"cutting after {layer!r} would need {len(extra) + 1} tensors to cross ({cut_node.name}, "
            f"{', '.join(extra)}); only single-tensor cuts are supported. Try one of {candidate_layers(model)}"
        )
    if all(n.op == "output" for n in nodes[len(head_nodes) :]):
        raise SplitError(f"{layer!r} is the model's last layer: nothing would be left for the tail")
    if cut_node not in crossing:
        raise SplitError(f"the output of {layer!r} is not used by the rest of the model")

    head_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in head_nodes:
        env[n] = head_graph.node_copy(n, lambda a: env[a])
    head_graph.output(env[cut_node])

    tail_graph = fx.Graph()
    env = {cut_node: tail_graph.placeholder("features")}
    for n in nodes[len(head_nodes) :]:
        env[n] = tail_graph.node_copy(n, lambda a: env[a])
    return SplitModel(fx.GraphModule(model, head_graph), fx.GraphModule(model, tail_graph), layer)


@torch.inference_mode()
def check_equivalence(model: nn.Module, split: SplitModel, inputs: torch.Tensor, atol: float = 1e-5) -> float:
    """max |model(x) - tail(head(x))| over ``inputs``; raises when it exceeds ``atol``."""
    model.eval()
    err = float((model(inputs) - split.tail(split.head(inputs))).abs().max())
    if not err <= atol:
        raise SplitError(f"split after {split.layer!r} changes the output: max abs error {err:.3g} > {atol}")
    return err


@dataclass
class ModuleCut:
    name: str  # the sub-module to cut after
    shape: tuple  # the features there, batch first
    label: str  # the sub-module's class


def module_cuts(model: nn.Module, example: torch.Tensor, max_depth: int = 2) -> list[ModuleCut]:
    """Every sub-module (down to ``max_depth`` levels) after which a single-tensor cut is possible, in the
    order the model runs them, with the shape of the features there."""
    model.eval()
    modules = dict(model.named_modules())
    shapes: dict[str, tuple] = {}

    def record(name: str):
        def hook(_module, _inputs, output) -> None:  # returns None: the output is left as it is
            if isinstance(output, torch.Tensor):
                shapes.setdefault(name, tuple(output.shape))

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in modules.items() if n and n.count(".") < max_depth]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for name in shapes:  # dicts keep insertion order: the order the forward pass reached them
        try:
            split_at(model, name)
        except (SplitError, fx.proxy.TraceError, TypeError, RuntimeError):
            continue
        out.append(ModuleCut(name, shapes[name], type(modules[name]).__name__))
    return out
