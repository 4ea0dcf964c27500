"""One fact, one place: every name FIRE gives a thing (model suffixes, tensors, files, environment
variables, headers, key files, ports, config parameters) is spelled in ``fire_backend/names.py`` and
nowhere else in the project's code. Docstrings, dict keys of Triton's own arguments and argparse
metavars are not names of ours and are not looked at."""

from __future__ import annotations

import ast
from pathlib import Path

import fire_backend.names as N

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["fire_backend", "zoo", "modelio", "calibration", "clients", "serving", "benchmarks", "loadtest", "fire_cli"]
# a third party's training script, run in its own environment without the project (it names its files itself)
OUTSIDE = {ROOT / "benchmarks" / "own_model" / "train_torchvision.py"}
PORTS = (N.HTTP_PORT, N.GRPC_PORT, N.METRICS_PORT, N.GATEWAY_HTTP_PORT, N.GATEWAY_GRPC_PORT, N.GATEWAY_METRICS_PORT)
# ordinary words (and library names) that are also values of ours
WORDS = set(N.METRICS_LEVELS) | set(N.PROFILES) | set(N.HALVES_RUNTIMES)


def _facts() -> dict[str, str]:
    facts = {v: k for k, v in vars(N).items() if k.isupper() and isinstance(v, str) and len(v) > 2 and v not in WORDS}
    facts.update({v: f"SUFFIXES[{k!r}]" for k, v in N.SUFFIXES.items()})
    return facts


def _ignored(tree: ast.AST) -> set[int]:
    """Constants that are docstrings, subscripts (``args["model_repository"]``: Triton's keys) or metavars."""
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            out.add(id(first.value))
        if isinstance(node, ast.Subscript):
            out |= {id(n) for n in ast.walk(node.slice)}
        if isinstance(node, ast.keyword) and node.arg == "metavar":
            out |= {id(n) for n in ast.walk(node.value)}
        if isinstance(node, ast.Dict):  # {"metavar": ...} handed to argparse
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "metavar":
                    out |= {id(n) for n in ast.walk(value)}
    return out


def _spelled(value, facts: dict[str, str]) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return "a port" if value in PORTS else None
    if not isinstance(value, str):
        return None
    if value in facts:
        return facts[value]
    if any(f":{p}" in value for p in PORTS):
        return "a port"
    for suffix in N.SUFFIXES.values():  # f"{name}_plain", "_plain (no defense)"
        if value.startswith(suffix) and (len(value) == len(suffix) or not value[len(suffix)].isalnum()):
            return "a model suffix"
    return None


def test_names_are_spelled_only_in_names_py():
    facts, problems = _facts(), []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "fire_backend" / "names.py" or path in OUTSIDE:
                continue
            tree = ast.parse(path.read_text())
            skip = _ignored(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and id(node) not in skip:
                    what = _spelled(node.value, facts)
                    if what:
                        problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r} spells {what}")
    assert not problems, "use fire_backend.names instead:\n" + "\n".join(problems)


def test_the_project_root_is_found_in_one_place():
    """``fire_backend.names.PROJECT_ROOT``, not another ``Path(__file__).resolve().parent...`` per module."""
    again = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != ROOT / "fire_backend" / "names.py" and "ROOT = Path(__file__)" in path.read_text():
                again.append(str(path.relative_to(ROOT)))
    assert not again, again
