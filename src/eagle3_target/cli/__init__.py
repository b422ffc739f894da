"""``eagle3-target`` command line: one subcommand per module.

Each subcommand lives in a module of this package that exposes ``register(subparsers)``;
this file only lists them (:data:`SUBCOMMAND_MODULES`) and dispatches. Heavy imports
(torch, transformers, engines, web frameworks) happen inside the handlers, so
``--help`` is instant. Only modules of this package import it; the library never does.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module
from typing import Sequence

__all__ = ["main", "build_parser", "SUBCOMMAND_MODULES"]

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"eagle3-target {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
