"""``eagle3-target`` command line: one subcommand per module.

Each subcommand lives in a module of this package that exposes ``register(subparsers)``;
this file only lists them (:data:`SUBCOMMAND_MODULES`) and dispatches. Heavy imports
(torch, transformers, engines, web frameworks) happen inside the handlers, so
``--help`` is instant. Only modules of this package import it; the library never does.

It also owns the one mapping from an exception to what a user reads
(:func:`error_message`): one line naming the problem, exit code 2 for a usage error
(bad flags or input, found before any work), 1 for a failure, 130 for Ctrl-C (with
the subcommand's own note, ``on_interrupt``, saying what is kept). No traceback
reaches the user; ``EAGLE3_TARGET_DEBUG=1`` shows it for a bug report.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from importlib import import_module
from typing import Sequence

__all__ = ["main", "build_parser", "error_message", "report_partial", "SUBCOMMAND_MODULES", "USAGE", "FAILURE",
           "INTERRUPTED", "DEBUG_ENV"]

USAGE, FAILURE, INTERRUPTED = 2, 1, 130
"""Exit codes: bad flags or input (nothing was done), a failure part-way, Ctrl-C."""
DEBUG_ENV = "EAGLE3_TARGET_DEBUG"
"""Set to 1 to see the traceback of an error instead of its one line."""

# Modules with a `register(subparsers)` function, in --help order.
SUBCOMMAND_MODULES: list[str] = [
    "eagle3_target.cli.tiny",
    "eagle3_target.cli.info",
    "eagle3_target.cli.forward",
    "eagle3_target.cli.bench",
    "eagle3_target.cli.demo",
    "eagle3_target.cli.serve",
    "eagle3_target.cli.regenerate",
    "eagle3_target.cli.vocab",
    "eagle3_target.cli.dump",
    "eagle3_target.cli.verify",
    "eagle3_target.cli.export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eagle3-target",
        description="Supervision for EAGLE-3 draft training: all-position logits and aux "
                    "hidden states from a target LLM.")
    from eagle3_target import __version__

    parser.add_argument("--version", action="version", version=f"eagle3-target {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        import_module(name).register(sub)
    return parser


# Flags whose value may start with a minus sign; argparse takes "-1,2,3" for a flag.
_NEGATIVE_VALUE_FLAGS = ("--aux-layers",)
_INT_LIST = re.compile(r"^-\d+(,\s*-?\d+)*$")

_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--aux-layers -1,2,3`` -> ``--aux-layers=-1,2,3``, so the ids reach the checks
    that name what is wrong with them."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in _NEGATIVE_VALUE_FLAGS and i + 1 < len(argv) and _INT_LIST.match(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def error_message(e: BaseException) -> tuple[str, int]:
    """``(one line for the user, exit code)`` of an exception a subcommand raised."""
    from eagle3_target.errors import InputError

    cause = e
    while isinstance(cause, RuntimeError) and cause.__cause__ is not None:
        cause = cause.__cause__  # "writing a shard failed" around the OSError that says why
    if isinstance(cause, OSError):
        e = cause
    if isinstance(e, (InputError, ValueError, FileExistsError, FileNotFoundError, NotADirectoryError,
                      IsADirectoryError)):
        return str(e), USAGE
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        why = e.strerror or str(e)
        if e.errno in _UNWRITABLE:
            return f"{where}not writable ({why}); choose a folder you can write to or fix its permissions", FAILURE
        if e.errno in _FULL:
            return f"{where}cannot write ({why}); free some space (or raise the file-size limit)", FAILURE
        return f"{where}{why}", FAILURE
    if isinstance(e, ImportError):
        name = f" {e.name}" if getattr(e, "name", None) else ""
        return f"a package is missing{name}: {e}", FAILURE
    if isinstance(e, RuntimeError):
        return str(e), FAILURE
    return (f"{type(e).__name__}: {e} (an unexpected error; {DEBUG_ENV}=1 shows where it was "
            f"raised)"), FAILURE


def report_partial(command: str, e: BaseException, kept: str) -> int:
    """A long job that failed part-way (a full disk, a lost server): prints one line,
    the error as :func:`error_message` words it and what ``kept`` says was kept;
    returns the exit code. dump, export and regenerate all end this way."""
    msg, code = error_message(e)
    print(f"eagle3-target {command}: error: {' '.join(msg.split())}; {kept}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    if not getattr(args, "func", None):
        parser.print_help()
        return USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        note = getattr(args, "on_interrupt", None)
        print(f"eagle3-target {args.command}: interrupted"
              + (f"; {note(args)}" if note is not None else ""), file=sys.stderr)
        return INTERRUPTED
    except Exception as e:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        msg, code = error_message(e)
        print(f"eagle3-target {args.command}: error: {' '.join(msg.split())}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
