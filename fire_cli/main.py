"""The ``fire`` command: one subcommand per step, each a thin wrapper over one Python function.

Each module here registers its own subcommands next to the functions that run them, with flags from
``fire_cli.options`` (one name, one meaning); nothing in the project imports this package (it is the
top rank). Expected failures (``FireError``, a file the system cannot open, a server that refuses or
is not there) end as one line, ``fire <command>: <what went wrong>``, and exit status 2. Anything else
is a bug: one line too, naming the exception, with the traceback only when ``names.TRACEBACK_ENV`` is
set (no traceback reaches a user unasked); Ctrl-C ends with one line and status 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fire_backend.errors import FireError
from fire_backend.names import TRACEBACK_ENV
from fire_cli import measure, pipeline, protect, serve, training

DESCRIPTION = "FIRE: feature-space inference-time repair of backdoored classifiers, served on Triton"
EXIT_FAILED, EXIT_INTERRUPTED = 2, 130


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
    except KeyboardInterrupt:
        print(f"fire {command}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:
        if _expected(e):
            message = str(e) if isinstance(e, FireError) else f"{type(e).__name__}: {e}"
        elif os.environ.get(TRACEBACK_ENV):
            raise
        else:
            first = (str(e).strip().splitlines() or [""])[0]
            message = f"unexpected error (a bug; {TRACEBACK_ENV}=1 shows where): {type(e).__name__}: {first}"
        print(f"fire {command}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from None


if __name__ == "__main__":
    main()
