"""The ``fire`` command: one subcommand per step, each a thin wrapper over one Python function.

Each module here registers its own subcommands next to the functions that run them, with flags from
``fire_cli.options`` (one name, one meaning); nothing in the project imports this package (it is the
top rank). Expected failures (``FireError``, a file the system cannot open, a server that refuses or
is not there) end as one line, ``fire <command>: <what went wrong>``, and exit status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fire_backend.errors import FireError
from fire_cli import measure, pipeline, protect, serve, training

DESCRIPTION = "FIRE: feature-space inference-time repair of backdoored classifiers, served on Triton"
EXIT_FAILED = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fire", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (protect, pipeline, serve, measure, training):
        module.register(sub)
    return p


def _expected(e: BaseException) -> bool:
    from tritonclient.utils import InferenceServerException

    return isinstance(e, FireError | OSError | InferenceServerException)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    command = " ".join(filter(None, [args.command, getattr(args, "benchmark", None)]))
    try:
        args.func(args)
    except Exception as e:
        if not _expected(e):
            raise
        message = str(e) if isinstance(e, FireError) else f"{type(e).__name__}: {e}"
        print(f"fire {command}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from None


if __name__ == "__main__":
    main()
