"""Argument helpers shared by several ``fire`` commands."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

Formatter = argparse.ArgumentDefaultsHelpFormatter  # every --help shows the defaults
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "models" / "cifar10_resnet_badnets"  # the demo's bundled backdoored model
FOLDED_HELP = ("also serve NAME_folded: head, repair and tail in one CPU stub (no hops between steps), "
               "directions still hot-swappable; on the GPU profile an alias of NAME")  # fmt: skip


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


def attack_spec(a: argparse.Namespace, default: str | dict | None = None) -> dict:
    """The attack chosen on the command line: ``--attack-config FILE`` (JSON, e.g. ``{"name": "custom",
    "pattern": "trigger.png", "alpha": 0.5}``), then ``--attack NAME``, then ``--attack-param`` overrides;
    without either, ``default`` (a name or a recorded spec). Parameters with no attack to apply them to
    are refused, never dropped."""
    spec: dict = {}
    if a.attack_config:
        spec = json.loads(Path(a.attack_config).read_text())
        if not isinstance(spec, dict) or "name" not in spec:
            raise SystemExit(f"{a.attack_config}: expected a JSON object with a 'name' field")
    if a.attack:
        spec["name"] = a.attack
    if not spec and default:
        spec = {"name": default} if isinstance(default, str) else dict(default)
    if not spec:
        if a.attack_param:
            raise SystemExit("--attack-param needs an attack to apply to: add --attack NAME or --attack-config FILE")
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
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="attack parameters, e.g. target=0 or, for custom, pattern=trigger.png alpha=0.5 mask=mask.png "
        "row=-1 col=-1 (one or more per use; repeatable)",
    )


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="127.0.0.1:8001", help="server address (gRPC 8001, HTTP 8000 by default)")
    p.add_argument("--protocol", default="grpc", choices=["grpc", "http"])


def add_preprocess_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "preprocessing", "how images become the model's input; completed from the model's input where unambiguous"
    )
    g.add_argument("--input-size", metavar="HxW", help="the model's input size (needed where it is dynamic)")
    g.add_argument("--layout", choices=["NCHW", "NHWC"], help="default: from where the channels sit")
    g.add_argument("--channels", choices=["RGB", "BGR", "L"], help="channel order the model expects (default RGB)")
    g.add_argument("--divisor", type=float, default=255.0, help="float inputs: x = pixel / divisor")
    g.add_argument("--mean", type=float, nargs="+", help="float inputs: then (x - mean) / std, per channel")
    g.add_argument("--std", type=float, nargs="+")


def preprocess_from_args(a: argparse.Namespace, dims: tuple, dtype: str):
    from modelio.preprocess import PreprocessError, infer_preprocess

    declared = {"layout": a.layout, "channels": a.channels, "divisor": a.divisor, "mean": a.mean, "std": a.std}
    if a.input_size:
        try:
            declared["height"], declared["width"] = (int(v) for v in a.input_size.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--input-size: expected HxW, e.g. 224x224, got {a.input_size!r}") from None
    try:
        return infer_preprocess(dims, dtype, **{k: v for k, v in declared.items() if v is not None})
    except PreprocessError as e:
        raise SystemExit(f"preprocessing: {e}") from None


def add_data_args(p: argparse.ArgumentParser, counts: bool = True) -> None:
    g = p.add_argument_group(
        "calibration images",
        "clean images (a folder in ImageFolder layout class/xxx.png gives labels, a flat folder none, or .npz), "
        "and either flagged triggered images (--poisoned) or a trigger to put on clean ones (--attack ...)",
    )
    g.add_argument("--clean", nargs="+", metavar="PATH", help="clean images: folders, files or .npz")
    g.add_argument("--poisoned", nargs="+", metavar="PATH", help="images flagged as triggered (no labels needed)")
    if counts:
        g.add_argument("--n-clean", type=int, default=1000, help="clean images to use at most")
        g.add_argument("--n-poisoned", type=int, default=200, help="triggered images to use at most")
    g.add_argument("--resize", action="store_true", help="resize images of another size instead of refusing them")


def calibration_set_from_args(a: argparse.Namespace, preprocess, clean_only: bool = False):
    """The CalibrationSet the data arguments describe (``a.attack*`` for a trigger spec); with
    ``clean_only`` just the clean images (an observe-only deployment)."""
    from calibration.calibrate import CalibrationSet
    from calibration.imagesets import ImageSetError, read_image_set
    from zoo.attacks import attack_from_spec

    if not a.clean:
        raise SystemExit("give clean calibration images with --clean PATH (a folder, files or .npz)")
    size = (preprocess.height, preprocess.width)
    if clean_only:
        try:
            pool = read_image_set(a.clean, size, a.resize).subset(a.n_clean, seed=a.seed)
        except ImageSetError as e:
            raise SystemExit(f"calibration images: {e}") from None
        return CalibrationSet(pool.images, pool.images[:0], clean_labels=pool.labels)
    spec = attack_spec(a)
    if a.poisoned and spec:
        raise SystemExit("give flagged triggered images (--poisoned PATH) or a trigger (--attack ...), not both")
    if not (a.poisoned or spec):
        raise SystemExit("give flagged triggered images (--poisoned PATH) or a trigger for clean ones (--attack ...)")
    try:
        clean = read_image_set(a.clean, size, a.resize)
        if a.poisoned:
            flagged = read_image_set(a.poisoned, size, a.resize).subset(a.n_poisoned or 200, seed=a.seed)
            pool = clean.subset(a.n_clean, seed=a.seed)
            provenance = {"clean": [str(p) for p in a.clean], "poisoned": [str(p) for p in a.poisoned]}
            return CalibrationSet(pool.images, flagged.images, clean_labels=pool.labels, provenance=provenance)
    except ImageSetError as e:
        raise SystemExit(f"calibration images: {e}") from None
    attack = attack_from_spec(spec)
    return CalibrationSet.with_trigger(
        clean.images, attack, a.n_poisoned or 200, a.n_clean, clean.labels, a.seed, {"clean": [str(p) for p in a.clean]}
    )
