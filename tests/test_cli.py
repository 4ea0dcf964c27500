"""The ``fire`` command's surface: one vocabulary, every flag used, one error shape.

- every flag of every subcommand is declared in ``fire_cli.options.VOCABULARY`` and its help starts with
  that one meaning (so a flag name cannot mean two things);
- every flag a subcommand parses is read by the code it runs (followed through the functions it passes
  the arguments to, and ``config_from`` field maps);
- every subcommand, given a missing file, a corrupt direction file or a wrong model name, ends with
  ``fire <command>: ...`` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
from pathlib import Path

import pytest

import fire_cli
from fire_cli.main import EXIT_FAILED, build_parser
from fire_cli.options import VOCABULARY

CLI_DIR = Path(fire_cli.__file__).parent


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaves(child, (*path, name))


LEAVES = list(_leaves(build_parser()))


def _flags(parser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("path,parser", LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_every_flag_has_its_one_meaning(path, parser):
    for action in _flags(parser):
        flag = action.option_strings[-1]
        assert flag in VOCABULARY, f"fire {' '.join(path)}: {flag} is not declared in fire_cli/options.py"
        meaning = VOCABULARY[flag].meaning.replace("%", "%%")
        assert (action.help or "").startswith(meaning), f"fire {' '.join(path)} {flag}: help drifts from its meaning"


class _Reads:
    """Which attributes of the parsed arguments a function (and what it passes them to) reads."""

    def __init__(self):
        self.functions: dict[str, tuple[ast.Module, ast.FunctionDef, int]] = {}
        self.constants: dict[str, dict] = {}
        for path in sorted(CLI_DIR.glob("*.py")):
            tree = ast.parse(path.read_text())
            for node in tree.body:
                if isinstance(node, ast.FunctionDef):
                    self.functions.setdefault(node.name, (tree, node, 0))
                elif isinstance(node, ast.ClassDef):
                    init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
                    if init:
                        self.functions.setdefault(node.name, (tree, init, 1))
                elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            self.constants[target.id] = ast.literal_eval(node.value)

    def of(self, name: str, position: int = 0, seen: set | None = None) -> set[str]:
        seen = seen if seen is not None else set()
        if (name, position) in seen or name not in self.functions:
            return set()
        seen.add((name, position))
        _, fn, offset = self.functions[name]
        params = [a.arg for a in fn.args.args]
        if position + offset >= len(params):
            return set()
        ns = params[position + offset]
        reads = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == ns:
                reads.add(node.attr)
            if not isinstance(node, ast.Call):
                continue
            callee = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            args = [a.id if isinstance(a, ast.Name) else None for a in node.args]
            if callee == "getattr" and args[:1] == [ns] and isinstance(node.args[1], ast.Constant):
                reads.add(node.args[1].value)
            if callee == "config_from" and args[1:2] == [ns] and args[2] in self.constants:
                reads |= set(self.constants[args[2]])
            for i, arg in enumerate(args):
                if arg == ns and callee:
                    reads |= self.of(callee, i, seen)
        return reads


READS = _Reads()


@pytest.mark.parametrize("path,parser", LEAVES, ids=[" ".join(p) for p, _ in LEAVES])
def test_every_flag_is_read(path, parser):
    func = parser.get_default("func")
    assert func is not None and not inspect.isbuiltin(func)
    reads = READS.of(func.__name__)
    for action in parser._actions:
        if action.dest in ("help", "func") or isinstance(action, argparse._SubParsersAction):
            continue
        assert action.dest in reads, f"fire {' '.join(path)}: {action.option_strings or action.dest} is never read"


def test_benchmarks_are_subcommands_with_their_own_flags(capsys):
    from fire_cli.main import main

    with pytest.raises(SystemExit):
        main(["bench", "efficacy", "--size", "224"])  # --size is the serving benchmark's
    assert "unrecognized arguments: --size" in capsys.readouterr().err
    names = {p[1] for p, _ in LEAVES if p[0] == "bench"}
    assert {"efficacy", "serving", "adaptive", "multimodel", "own-model", "memory", "traffic", "gateway"} <= names


# -- bad input: one line, exit 2, never a traceback ---------------------------------------------------


@pytest.fixture(scope="module")
def bad(artifacts, tmp_path_factory):
    """A real repository, and the bad inputs the cases below name."""
    from serving.repository import ProtectedModel, build_repository

    a = artifacts["cifar10"]
    d = tmp_path_factory.mktemp("bad")
    repo = d / "repo"
    build_repository([ProtectedModel("cifar10", a.export_dir, a.directions, folded=True)], repo)
    corrupt = d / "corrupt.safetensors"
    corrupt.write_bytes(a.directions.read_bytes()[:-100] + b"\0" * 100)
    notonnx = d / "model.onnx"
    notonnx.write_bytes(b"not an onnx model")
    return {"REPO": str(repo), "EXPORT": str(a.export_dir), "CORRUPT": str(corrupt), "NOTONNX": str(notonnx),
            "MISSING": str(d / "missing"), "OUT": str(d / "out"), "DEAD": "127.0.0.1:9"}  # fmt: skip


CASES = [
    "layers --onnx MISSING",
    "layers --onnx NOTONNX",
    "protect --onnx MISSING --clean MISSING --poisoned MISSING --out OUT",
    "protect --source-repo REPO --source-model no_such_model --clean MISSING --out OUT",
    "export --model-dir MISSING --out OUT",
    "calibrate --export MISSING",
    "calibrate --auto --model-dir MISSING --export OUT",
    "verify CORRUPT EXPORT",
    "verify MISSING EXPORT",
    "build-repo --entry m EXPORT CORRUPT --out OUT",
    "build-repo --entry m MISSING CORRUPT --out OUT",
    "build-engines --repo MISSING",
    "serve --repo MISSING",
    "gateway --repo MISSING --out OUT",
    "reload --repo REPO --model no_such_model --directions CORRUPT --metrics-url ''",
    "reload --repo REPO --model cifar10 --directions CORRUPT --metrics-url ''",
    "reload --repo REPO --model cifar10_folded --directions MISSING --metrics-url ''",
    "update --repo REPO --model no_such_model --poisoned MISSING",
    "update --repo REPO --model cifar10 --from-traffic --clean MISSING",
    "rollback --repo REPO --model no_such_model",
    "rollback --repo REPO --model cifar10_folded --to 9",
    "eval --url DEAD --models no_such_model --repo REPO --limit 2",
    "classify --url DEAD --model cifar10 MISSING",
    "bench adaptive --model-dirs MISSING --out OUT",
    "loadtest --repo MISSING --out OUT",
    "soak --repo MISSING --minutes 0.01 --out OUT/soak.md",
    "demo --model-dir MISSING --out ''",
    "train --attack no_such_attack --out OUT --epochs 1",
    "rescore --model-dir MISSING",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_line_and_exit_2(case, bad, capsys):
    from fire_cli.main import main

    argv = [bad.get(w, w) for w in case.split()]
    argv = ["" if w == "''" else w for w in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == EXIT_FAILED, err
    command = argv[0] if argv[0] != "bench" else f"bench {argv[1]}"
    assert err.startswith(f"fire {command}: ") and "Traceback" not in err, err
    assert err.strip().count("\n") == 0, err


def test_a_trigger_named_relative_to_its_file_is_found_from_anywhere(tmp_path, monkeypatch):
    """--attack-config and model.json name trigger files relative to themselves, not to the cwd."""
    import numpy as np

    from fire_cli.common import attack_spec
    from zoo.attacks import attack_from_spec

    (tmp_path / "cfg").mkdir()
    np.save(tmp_path / "cfg" / "patch.npy", np.full((4, 4, 3), 255, np.uint8))
    (tmp_path / "cfg" / "attack.json").write_text(json.dumps({"name": "custom", "pattern": "patch.npy"}))
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(attack=None, attack_config="cfg/attack.json", attack_param=[])
    attack = attack_from_spec(attack_spec(args))
    assert attack.apply(np.zeros((1, 32, 32, 3), np.uint8)).max() == 255


def test_an_unexpected_error_is_one_line_unless_its_traceback_is_asked_for(monkeypatch, capsys):
    """A bug (an exception no FIRE code expects) ends as one line naming it, status 2, no traceback;
    ``FIRE_TRACEBACK`` set, the exception propagates with its traceback."""
    from fire_backend.names import TRACEBACK_ENV
    from fire_cli import protect
    from fire_cli.main import main

    def broken(args):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(protect, "layers", broken)
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        main(["layers", "model.onnx"])
    err = capsys.readouterr().err
    assert e.value.code == EXIT_FAILED and err.count("\n") == 1, err
    assert err.startswith("fire layers: unexpected error") and "ZeroDivisionError: division by zero" in err
    assert TRACEBACK_ENV in err and "second line" not in err
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ZeroDivisionError):
        main(["layers", "model.onnx"])
