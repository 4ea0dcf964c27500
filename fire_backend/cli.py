"""The ``fire`` command: one subcommand per step, each a thin wrapper over a Python function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _parse_kv(items: Sequence[str]) -> dict:
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


def cmd_train(a: argparse.Namespace) -> None:
    from fire_backend.train import TrainConfig, train

    cfg = TrainConfig(dataset=a.dataset, arch=a.arch, widths=tuple(a.widths), blocks=a.blocks, attack=a.attack,
                      attack_params=_parse_kv(a.attack_param), epochs=a.epochs, batch_size=a.batch_size,
                      lr=a.lr, hflip=not a.no_hflip, train_subset=a.train_subset, seed=a.seed,
                      threads=a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text("fire " + " ".join(sys.argv[1:]) + "\n")
    train(cfg, out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fire", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a backdoored model (resumable, checkpoint per epoch)")
    t.add_argument("--dataset", default="cifar10", choices=["cifar10", "gtsrb"])
    t.add_argument("--arch", default="resnet_small")
    t.add_argument("--widths", type=int, nargs=3, default=[16, 32, 64])
    t.add_argument("--blocks", type=int, default=1)
    t.add_argument("--attack", default="badnets")
    t.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE",
                   help="override an attack parameter, e.g. target=0 poison_rate=0.1 (repeatable)")
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--no-hflip", action="store_true", help="no horizontal flips (use for traffic signs)")
    t.add_argument("--train-subset", type=int, default=0, help="train on N random images (0 = all)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--out", required=True, help="model directory to write")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
