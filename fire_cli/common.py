"""Argument helpers shared by several ``fire`` commands."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

Formatter = argparse.ArgumentDefaultsHelpFormatter  # every --help shows the defaults
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "models" / "cifar10_resnet_badnets"  # the demo's bundled backdoored model


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
            raise SystemExit(f"expected key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def attack_spec(a: argparse.Namespace, default: str | None = None) -> dict:
    """The attack chosen on the command line: ``--attack-config FILE`` (JSON, e.g. ``{"name": "custom",
    "pattern": "trigger.png", "alpha": 0.5}``), then ``--attack NAME``, then ``--attack-param`` overrides."""
    spec: dict = {}
    if a.attack_config:
        spec = json.loads(Path(a.attack_config).read_text())
        if not isinstance(spec, dict) or "name" not in spec:
            raise SystemExit(f"{a.attack_config}: expected a JSON object with a 'name' field")
    if a.attack:
        spec["name"] = a.attack
    if not spec and default:
        spec = {"name": default}
    if not spec:
        return {}
    return {**spec, **parse_kv(a.attack_param)}


def add_attack_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--attack",
        default=default,
        help="attack name: badnets, blended, wanet, sig, trojan, badnets_all2all, custom",
    )
    p.add_argument("--attack-config", help="JSON file with the attack spec (name and parameters)")
    p.add_argument(
        "--attack-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an attack parameter, e.g. target=0 or, for custom, pattern=trigger.png alpha=0.5 "
        "mask=mask.png row=-1 col=-1 (repeatable)",
    )


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="127.0.0.1:8001", help="server address (gRPC 8001, HTTP 8000 by default)")
    p.add_argument("--protocol", default="grpc", choices=["grpc", "http"])
