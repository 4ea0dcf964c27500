"""Every flag of the ``fire`` command, declared once: its name, its one meaning, its type.

A subcommand adds a flag with ``add(parser, "--flag", ...)``: the help text starts with the flag's
meaning here (the same on every subcommand) and may add what is particular to that command; a default
that a config dataclass holds is read from it (``default_of``), never typed again. ``add_fields``
declares several flags from one dataclass and ``config_from`` builds the dataclass back from the
parsed arguments. ``tests/test_cli.py`` walks every parser and fails on a flag that is not declared
here, on a help text that drifts from its meaning, and on a flag that no command reads.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fire_backend.names import AUGMENTS, METRICS_LEVELS, PROFILES

MODES = ["subtract", "project", "gated"]


@dataclass(frozen=True)
class Option:
    flag: str
    meaning: str
    kwargs: dict = field(default_factory=dict)


def _options(*items: Option) -> dict[str, Option]:
    return {o.flag: o for o in items}


VOCABULARY = _options(
    # which model
    Option("--model", "a served model's name (a protected model, or any model of the repository)"),
    Option("--models", "served models' names", {"nargs": "+"}),
    Option("--model-dir", "a zoo model directory (written by `fire train`)"),
    Option("--model-dirs", "zoo model directories (written by `fire train`)", {"nargs": "+"}),
    Option("--onnx", "the model as an ONNX file"),
    Option(
        "--torch",
        "the model as TorchScript, package.module:factory, torchvision:NAME or timm:NAME",
        {"metavar": "SPEC"},
    ),  # fmt: skip
    Option("--weights", "--torch factories: weights (.safetensors, or a state dict read with weights_only)"),
    Option("--num-classes", "--torch factories: the number of classes passed to the constructor", {"type": int}),
    Option("--source-repo", "a Triton model repository that holds the model to protect (with --source-model)"),
    Option("--source-model", "the model's name in --source-repo"),
    # files
    Option("--repo", "the FIRE model repository (what `fire serve` serves)"),
    Option(
        "--entry",
        "a protected model to write: its served name, export directory and direction file "
        "(FIRST,SECOND for a two-layer export); repeatable: one server hosts many",
        {"nargs": 3, "action": "append", "metavar": ("NAME", "EXPORT", "DIRECTIONS")},
    ),  # fmt: skip
    Option("--out", "what this command writes"),
    Option("--out2", "a two-layer export: the second direction file this command writes"),
    Option("--export", "an export directory (head.onnx, tail.onnx, split.json)"),
    Option("--directions", "a direction file"),
    Option("--work-dir", "where intermediate files go"),
    # the server
    Option("--url", "the server's address for --protocol (host:port; gRPC 8001, HTTP 8000 by default)"),
    Option("--protocol", "the protocol to the server", {"choices": ["grpc", "http"]}),
    Option("--metrics-url", "the server's metrics endpoint, to wait until it serves a new file ('' to not wait)"),
    Option("--profile", "the serving profile", {"choices": list(PROFILES)}),
    Option("--host", "the address tritonserver binds (loopback by default)"),
    Option("--http-port", "tritonserver's HTTP port", {"type": int}),
    Option("--grpc-port", "tritonserver's gRPC port", {"type": int}),
    Option("--metrics-port", "tritonserver's metrics port", {"type": int}),
    Option(
        "--model-control",
        "none: no load/unload over the network (directions still hot-reload from the "
        "repository); explicit: load/unload with the admin key, a stub watchdog reloads a crashed model",
        {"choices": ["none", "explicit"]},
    ),  # fmt: skip
    Option("--tls-cert", "PEM certificate: serve gRPC over TLS (with --tls-key)"),
    Option("--tls-key", "PEM private key for --tls-cert"),
    Option("--tls-pem", "certificate and key in one PEM: HTTPS and gRPC over TLS on the gateway's listeners"),
    Option("--insecure", "allow plaintext on a non-loopback address", {"action": "store_true"}),
    Option("--allow-remote", "allow a load-test target that is not a loopback address", {"action": "store_true"}),
    Option("--triton-http", "where Triton's HTTP endpoint listens (host:port)"),
    Option("--triton-grpc", "where Triton's gRPC endpoint listens (host:port)"),
    Option("--listen-http", "the gateway's HTTP(S) address"),
    Option("--listen-grpc", "the gateway's gRPC address"),
    Option("--listen-metrics", "also pass Prometheus' GET /metrics on this address (host:port, e.g. on 0.0.0.0)"),
    Option("--maxconn", "connections the gateway accepts in all", {"type": int}),
    Option("--per-source-maxconn", "connections one client address may hold at the gateway", {"type": int}),
    Option(
        "--max-request-bytes",
        "the largest request the gateway buffers and checks (the buffer of a model with variable dims)",
        {"type": int},
    ),  # fmt: skip
    # serving settings
    Option("--max-batch-size", "the largest batch a served model takes", {"type": int}),
    Option("--max-queue-delay-us", "dynamic batching: how long a request may wait for others", {"type": int}),
    Option("--instances", "model instances per step (Triton instance_group count)", {"type": int}),
    Option("--repair-instances", "the repair step's instance count (None: the --instances count)", {"type": int}),
    Option("--tensorrt", "also build the GPU profile's TensorRT engines (needs a GPU)", {"action": "store_true"}),
    Option("--rebuild", "rebuild engines that exist too", {"action": "store_true"}),
    Option("--previous", "put back what the last change replaced", {"action": "store_true"}),
    Option("--plain", "also serve NAME_plain, head -> tail, unprotected (comparisons only)", {"action": "store_true"}),
    Option(
        "--folded",
        "also serve NAME_folded: head, repair and tail in one CPU stub (no hops between steps), "
        "directions still hot-swappable; on the GPU profile an alias of NAME",
        {"action": "store_true"},
    ),  # fmt: skip
    Option(
        "--drop-original",
        "leave out the original model (NAME_unprotected) of a --source-repo entry",
        {"action": "store_true"},
    ),  # fmt: skip
    Option(
        "--observe",
        "no triggered images yet: serve a direction that changes nothing and record the traffic, "
        "then find the direction there with `fire update --from-traffic`",
        {"action": "store_true"},
    ),  # fmt: skip
    Option(
        "--metrics",
        "FIRE's metrics: off, on (counts and the direction in use) or detailed (also per-sample "
        "scores, readable by anyone on the metrics port)",
        {"choices": list(METRICS_LEVELS)},
    ),  # fmt: skip
    # the repair
    Option(
        "--cut",
        "where to cut the model: a sub-module (zoo models: layer1, layer2, layer3) or an ONNX tensor "
        "(see `fire layers`)",
    ),  # fmt: skip
    Option("--cut2", "multi-layer repair: a second, later cut"),
    Option(
        "--pixels",
        "a zoo model's served input: float (NCHW in [0, 1], what it was trained on) or uint8 "
        "(raw NHWC pixels, what image files decode to and stock image clients send)",
        {"choices": ["float", "uint8"]},
    ),  # fmt: skip
    Option("--cuts", "candidate cuts (default: every repairable one)", {"nargs": "+"}),
    Option("--mode", "the repair mode", {"choices": MODES}),
    Option("--alpha", "the repair's strength (1: remove the estimated trigger component)", {"type": float}),
    Option("--estimator", "how beta is estimated", {"choices": ["paired", "unpaired"]}),
    Option("--fpr", "gated mode: clean false-positive rate of the gate", {"type": float}),
    Option("--views", "unpaired estimator without spatial views: photometric views per image", {"type": int}),
    Option(
        "--augment",
        "spatial views of the calibration images the estimate covers (flips, shifts, zooms about the "
        "trigger: a rank-k repair), or none (rank 1)",
        {"choices": list(AUGMENTS)},
    ),  # fmt: skip
    Option(
        "--auto",
        "choose automatically from held-out calibration samples, without the test set",
        {"action": "store_true"},
    ),  # fmt: skip
    Option(
        "--max-ca-drop",
        "clean accuracy it may cost, in points (images without labels: percent of clean predictions changed)",
        {"type": float},
    ),  # fmt: skip
    # data
    Option(
        "--clean",
        "clean images: folders (class/xxx.png gives labels, a flat folder none), files or .npz",
        {"nargs": "+", "metavar": "PATH"},
    ),  # fmt: skip
    Option(
        "--poisoned",
        "images flagged as triggered (no labels needed): folders, files or .npz",
        {"nargs": "+", "metavar": "PATH"},
    ),  # fmt: skip
    Option("--n-clean", "clean calibration images to use at most", {"type": int}),
    Option("--n-poisoned", "triggered calibration images to use at most", {"type": int}),
    Option("--resize", "resize images of another size instead of refusing them", {"action": "store_true"}),
    Option(
        "--triggered",
        "images carrying a trigger, labeled with their true classes (ImageFolder or .npz)",
        {"nargs": "+", "metavar": "PATH"},
    ),  # fmt: skip
    Option("--target", "the attacker's class (default: the attack the direction file records)", {"type": int}),
    Option("--dataset", "a bundled dataset", {"choices": ["cifar10", "gtsrb"]}),
    Option("--limit", "evaluate on a seeded subset of N test images (0: all)", {"type": int}),
    Option("--seed", "random seed", {"type": int}),
    # preprocessing
    Option("--input-size", "the model's input size (needed where it is dynamic)", {"metavar": "HxW"}),
    Option("--layout", "where the channels sit (default: from the model's input)", {"choices": ["NCHW", "NHWC"]}),
    Option("--channels", "channel order the model expects (default RGB)", {"choices": ["RGB", "BGR", "L"]}),
    Option("--divisor", "float inputs: x = pixel / divisor", {"type": float}),
    Option("--mean", "float inputs: then (x - mean) / std, per channel", {"type": float, "nargs": "+"}),
    Option("--std", "float inputs: the std of --mean", {"type": float, "nargs": "+"}),
    # attacks
    Option("--attack", "attack name: badnets, blended, wanet, sig, trojan, badnets_all2all, custom"),
    Option("--attack-config", "JSON file with the attack spec (name and parameters)"),
    Option(
        "--attack-param",
        "attack parameters, e.g. target=0 or, for custom, pattern=trigger.png alpha=0.5 "
        "mask=mask.png row=-1 col=-1 (one or more per use; repeatable)",
        {"action": "extend", "nargs": "+", "metavar": "KEY=VALUE"},
    ),  # fmt: skip
    # updates
    Option("--from-traffic", "find the direction in the traffic the server saw", {"action": "store_true"}),
    Option("--approve", "deploy the proposal (an operator's approval)", {"action": "store_true"}),
    Option("--force", "even with a direction serving that changes features", {"action": "store_true"}),
    Option("--min-score", "a class's mean shift over the median that counts as a backdoor", {"type": float}),
    Option("--min-samples", "triggered reports before an update takes effect", {"type": int}),
    Option("--max-step", "largest move of beta per update, x |beta|", {"type": float}),
    Option("--to", "the direction version to reinstate (default: the one before the live one)", {"type": int}),
    # load
    Option("--users", "concurrent simulated clients", {"type": int}),
    Option("--spawn-rate", "clients started per second (0: all at once)", {"type": float}),
    Option("--run-time", "seconds per model", {"type": int}),
    Option("--batch-size", "images per request", {"type": int}),
    Option("--triggered-ratio", "share of requests carrying the trigger", {"type": float}),
    Option("--minutes", "how long to run", {"type": float}),
    Option("--rate", "requests per second, gRPC and HTTP together", {"type": float}),
    Option("--labels", "a file of class names, one per line (printed beside each label)"),
    # benchmarks
    Option("--quick", "the benchmark's smoke preset (numbers not for reporting)", {"action": "store_true"}),
    Option(
        "--size",
        "the model's input size: the bundled CIFAR-10 one (32) or a 224x224 one",
        {"type": int, "choices": [32, 224]},
    ),  # fmt: skip
    Option("--no-ablations", "headline defenses only", {"action": "store_true"}),
    Option(
        "--every-cut",
        "also measure FIRE at every cut and strength the cut search weighed (slow)",
        {"action": "store_true"},
    ),
    Option(
        "--keep-others",
        "measure only the models named; keep every other model's rows from the adaptive.csv already there",
        {"action": "store_true"},
    ),
    # training
    Option("--arch", "the architecture to train"),
    Option("--widths", "channel widths of the three stages", {"type": int, "nargs": 3}),
    Option("--blocks", "residual blocks per stage", {"type": int}),
    Option("--epochs", "training epochs", {"type": int}),
    Option("--train-batch-size", "training batch size", {"type": int}),
    Option("--lr", "learning rate", {"type": float}),
    Option("--no-hflip", "no horizontal flips (use for traffic signs)", {"action": "store_true"}),
    Option("--train-subset", "train on N random images (0: all)", {"type": int}),
    Option("--threads", "torch threads (0: torch's default)", {"type": int}),
)

_UNSET = object()


def default_of(cls: type, name: str) -> Any:
    """The default of dataclass ``cls``'s field ``name`` (calling its factory), as argparse takes it."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return list(value) if isinstance(value, tuple) else value


def add(p, flag: str, *, detail: str | None = None, default: Any = _UNSET, required: bool = False,
        dest: str | None = None) -> argparse.Action:  # fmt: skip
    """Add ``flag`` with its meaning from VOCABULARY (``detail``: what is particular to this command)."""
    o = VOCABULARY[flag]
    text = o.meaning + (f"; {detail}" if detail else "")
    kwargs = dict(o.kwargs)
    if default is not _UNSET:
        kwargs["default"] = default
    elif kwargs.get("action") == "extend":
        kwargs["default"] = []
    if dest:
        kwargs["dest"] = dest
    if required:
        kwargs["required"] = True
    return p.add_argument(flag, help=text.replace("%", "%%"), **kwargs)


def add_fields(p, cls: type, fields: dict[str, str], details: dict[str, str] | None = None) -> None:
    """Flags for dataclass ``cls``'s fields (field -> flag), defaults read from the dataclass."""
    for name, flag in fields.items():
        add(p, flag, detail=(details or {}).get(name), default=default_of(cls, name), dest=name)


def config_from(cls: type, a: argparse.Namespace, fields: dict[str, str], **fixed: Any):
    """``cls`` built from the parsed flags of ``fields`` (as ``add_fields`` declared them) and ``fixed``."""
    defaults = {f.name: default_of(cls, f.name) for f in dataclasses.fields(cls) if f.name in fields}
    values = {}
    for name in fields:
        v, d = getattr(a, name), defaults[name]
        if isinstance(v, list) and isinstance(d, list):
            v = tuple(v)
        elif isinstance(v, str) and isinstance(d, Path):
            v = Path(v)
        values[name] = v
    return cls(**values, **fixed)
