"""The project's import graph, read from the source (ast): imports point down the ranks only, there are
no cycles, nothing imports the CLI, and what runs inside a Triton stub carries only the core.

Ranks (README, "Layout"): a module may import its own rank or any rank below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RANKS = {
    "fire_backend": 0,  # the repair core, the direction file, names; the Triton model shims
    "zoo": 1,  # datasets, architectures, attacks, training, CA/ASR/PA
    "modelio": 2,  # split, export ONNX / TensorRT, fuse
    "calibration": 3,  # estimators, direction-file factory, calibrate, auto-calibration
    "clients": 4,  # tritonclient wrappers, evaluation through the server
    "serving": 5,  # repository writer, server launcher, model control, streaming updates
    "benchmarks": 6,
    "loadtest": 6,
    "fire_cli": 7,  # the `fire` command: imported by nothing
}
STUB_PACKAGE = "fire_backend.triton"
NOT_IN_A_STUB = {"PIL", "tqdm", "matplotlib", "locust", "zoo", "modelio", "calibration", "clients", "serving"}
CORE_THIRD_PARTY = {"torch", "numpy", "safetensors", "onnxruntime", "triton_python_backend_utils"}


def _modules() -> dict[str, Path]:
    out = {}
    for package in RANKS:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every absolute import in a file, at any depth (function-level imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _project_module(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


GRAPH = {m: {t for i in _imports(p) if (t := _project_module(i)) and t != m} for m, p in MODULES.items()}
THIRD_PARTY = {m: {i.split(".")[0] for i in _imports(p)} - set(RANKS) for m, p in MODULES.items()}


def _rank(module: str) -> int:
    return RANKS[module.split(".")[0]]


def test_the_walk_sees_the_whole_project():
    assert len(MODULES) > 40 and "fire_backend.repair" in MODULES and "fire_cli.main" in MODULES
    assert "fire_backend.directions" in GRAPH["fire_backend.repair"]


def test_imports_point_down_only():
    upward = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets if _rank(b) > _rank(a))
    assert upward == []


def test_nothing_imports_the_cli():
    assert sorted(a for a, t in GRAPH.items() if not a.startswith("fire_cli") and any("fire_cli" in b for b in t)) == []


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert cycles == []


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += GRAPH[m]
    return seen


STUBS = sorted(m for m in MODULES if m.startswith(STUB_PACKAGE + "."))


@pytest.mark.parametrize("stub", STUBS)
def test_a_triton_stub_carries_only_the_core(stub):
    closure = _closure(stub)
    assert {m.split(".")[0] for m in closure} == {"fire_backend"}, closure
    third_party = set().union(*(THIRD_PARTY[m] for m in closure))
    assert not third_party & NOT_IN_A_STUB
    import sys

    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    assert third_party - stdlib <= CORE_THIRD_PARTY, third_party - stdlib


def test_the_core_uses_only_torch_numpy_safetensors():
    core = [m for m in MODULES if m.startswith("fire_backend") and not m.startswith(STUB_PACKAGE)]
    import sys

    allowed = set(sys.stdlib_module_names) | {"__future__", "torch", "numpy", "safetensors", "onnxruntime"}
    assert {m: THIRD_PARTY[m] - allowed for m in core if THIRD_PARTY[m] - allowed} == {}


def test_the_checker_catches_an_upward_edge_and_a_cycle():
    """The rules above can fail: a planted upward import and a planted cycle are found."""
    GRAPH["fire_backend.repair"].add("serving.server")
    GRAPH["serving.server"].add("serving.control")
    GRAPH["serving.control"].add("serving.server")
    try:
        with pytest.raises(AssertionError):
            test_imports_point_down_only()
        with pytest.raises(AssertionError):
            test_no_import_cycles()
        with pytest.raises(AssertionError):
            test_a_triton_stub_carries_only_the_core("fire_backend.triton.repair_model")
    finally:
        GRAPH["fire_backend.repair"].discard("serving.server")
        GRAPH["serving.server"].discard("serving.control")
        if "serving.server" not in _imports(MODULES["serving.control"]):
            GRAPH["serving.control"].discard("serving.server")
