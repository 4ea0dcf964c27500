"""Argument helpers shared by several ``fire`` commands (flags come from ``fire_cli.options``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from fire_backend.errors import FireError
from fire_backend.names import GRPC_PORT, HTTP_PORT, PROJECT_ROOT, REPOSITORY_DIR, address
from fire_cli.options import add


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every --help shows the defaults, except where there is none to show (None, off) or the flag's text
    already says it ("(default ...")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "(default" in text:
            return text
        return super()._get_help_string(action)


DEFAULT_MODEL_DIR = PROJECT_ROOT / "models" / "cifar10_resnet_badnets"  # the demo's bundled backdoored model


class UsageError(FireError):
    """The arguments do not describe something the command can do; the message says what to give."""


def add_command(sub, name: str, help_text: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=Formatter)
    p.set_defaults(func=func)
    return p


def parse_kv(items: Sequence[str]) -> dict:
    """``key=value`` pairs; values are read as JSON where they parse (numbers, lists), else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"expected key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def attack_spec(a: argparse.Namespace, default: str | dict | None = None) -> dict:
    """The attack chosen on the command line: ``--attack-config FILE`` (JSON, e.g. ``{"name": "custom",
    "pattern": "trigger.png", "alpha": 0.5}``; relative paths in it are relative to the file), then
    ``--attack NAME``, then ``--attack-param`` overrides; without either, ``default`` (a name or a
    recorded spec). Parameters with no attack to apply them to are refused, never dropped."""
    spec: dict = {}
    if a.attack_config:
        path = Path(a.attack_config)
        try:
            spec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"--attack-config {path}: {e}") from None
        if not isinstance(spec, dict) or "name" not in spec:
            raise UsageError(f"{path}: expected a JSON object with a 'name' field")
        from zoo.attacks import resolve_trigger_files

        spec = resolve_trigger_files(spec, path.parent)
    if a.attack:
        spec["name"] = a.attack
    if not spec and default:
        spec = {"name": default} if isinstance(default, str) else dict(default)
    if not spec:
        if a.attack_param:
            raise UsageError("--attack-param needs an attack to apply to: add --attack NAME or --attack-config FILE")
        return {}
    return {**spec, **parse_kv(a.attack_param)}


def add_attack_args(p: argparse.ArgumentParser) -> None:
    for flag in ("--attack", "--attack-config", "--attack-param"):
        add(p, flag)


def add_server_args(p: argparse.ArgumentParser) -> None:
    add(p, "--url", default=None, detail=f"default {address(GRPC_PORT)} (gRPC) or {address(HTTP_PORT)} (HTTP)")
    add(p, "--protocol", default="grpc")


def server_url(a: argparse.Namespace) -> str:
    return a.url or address(GRPC_PORT if a.protocol == "grpc" else HTTP_PORT)


def add_repo_arg(p: argparse.ArgumentParser, detail: str | None = None) -> None:
    add(p, "--repo", default=REPOSITORY_DIR, detail=detail)


def add_preprocess_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "preprocessing", "how images become the model's input; completed from the model's input where unambiguous"
    )
    for flag in ("--input-size", "--layout", "--channels"):
        add(g, flag)
    add(g, "--divisor", default=255.0)
    add(g, "--mean")
    add(g, "--std")


def input_size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--input-size: expected HxW, e.g. 224x224, got {text!r}") from None
    return h, w


def preprocess_from_args(a: argparse.Namespace, dims: tuple, dtype: str):
    from modelio.preprocess import infer_preprocess

    declared = {"layout": a.layout, "channels": a.channels, "divisor": a.divisor, "mean": a.mean, "std": a.std}
    size = input_size(a.input_size)
    if size:
        declared["height"], declared["width"] = size
    return infer_preprocess(dims, dtype, **{k: v for k, v in declared.items() if v is not None})


def add_data_args(p: argparse.ArgumentParser, counts: bool = True) -> None:
    g = p.add_argument_group(
        "calibration images",
        "clean images, and either flagged triggered images (--poisoned) or a trigger to put on clean ones (--attack)",
    )
    add(g, "--clean")
    add(g, "--poisoned")
    if counts:
        add(g, "--n-clean", default=1000)
        add(g, "--n-poisoned", default=200)
    add(g, "--resize")


def calibration_set_from_args(a: argparse.Namespace, preprocess, clean_only: bool = False):
    """The CalibrationSet the data arguments describe (``a.attack*`` for a trigger spec); with
    ``clean_only`` just the clean images (an observe-only deployment)."""
    from calibration.calibrate import CalibrationSet
    from calibration.imagesets import read_image_set
    from zoo.attacks import attack_from_spec

    if not a.clean:
        raise UsageError("give clean calibration images with --clean PATH (a folder, files or .npz)")
    size = (preprocess.height, preprocess.width)
    if clean_only:
        pool = read_image_set(a.clean, size, a.resize).subset(a.n_clean, seed=a.seed)
        return CalibrationSet(pool.images, pool.images[:0], clean_labels=pool.labels)
    spec = attack_spec(a)
    if a.poisoned and spec:
        raise UsageError("give flagged triggered images (--poisoned PATH) or a trigger (--attack ...), not both")
    if not (a.poisoned or spec):
        raise UsageError("give flagged triggered images (--poisoned PATH) or a trigger for clean ones (--attack ...)")
    clean = read_image_set(a.clean, size, a.resize)
    if a.poisoned:
        flagged = read_image_set(a.poisoned, size, a.resize).subset(a.n_poisoned or 200, seed=a.seed)
        pool = clean.subset(a.n_clean, seed=a.seed)
        provenance = {"clean": [str(p) for p in a.clean], "poisoned": [str(p) for p in a.poisoned]}
        return CalibrationSet(pool.images, flagged.images, clean_labels=pool.labels, provenance=provenance)
    attack = attack_from_spec(spec)
    return CalibrationSet.with_trigger(
        clean.images, attack, a.n_poisoned or 200, a.n_clean, clean.labels, a.seed, {"clean": [str(p) for p in a.clean]}
    )
