"""The ``fire`` command: one subcommand per step, each a thin wrapper over one Python function.

Each module here registers its own subcommands next to the functions that run them; nothing in the
project imports this package (it is the top rank)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fire_cli import measure, pipeline, protect, serve, training

DESCRIPTION = "FIRE: feature-space inference-time repair of backdoored classifiers, served on Triton"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fire", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    for module in (protect, pipeline, serve, measure, training):
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
