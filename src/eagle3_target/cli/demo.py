"""``eagle3-target demo``: the main job end to end on the built-in tiny model
(:mod:`.demo_steps`), what ``make demo`` runs."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from eagle3_target.cli.demo_steps import run_demo

    return run_demo(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the built-in tiny model and summarise it")
    p.add_argument("--model", default=None, help="model directory (default: built-in tiny model)")
    p.set_defaults(func=_cmd_demo)
