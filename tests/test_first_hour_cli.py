"""Every subcommand, given careless arguments, answers with one line that names the
problem and exits 2 (usage) or 1 (failure): never a traceback.

The cases are drawn from each subcommand's own parser (every module in
``SUBCOMMAND_MODULES``, so a subcommand added later is covered without editing this
file): an unknown flag, a non-number for every numeric flag, and, where the flag exists,
a missing model folder, ``--device cuda`` on a machine without CUDA, ``--engine sglang``
where it cannot run, unknown and unloadable ``--engine-arg``, negative ``--aux-layers``,
ports out of range, an output in a read-only folder and missing input files. Each runs
in a real subprocess."""

from __future__ import annotations

import argparse
import json
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest
import torch
from first_hour import readonly_dir, run_cli

from eagle3_target.cli import SUBCOMMAND_MODULES, build_parser


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUBCOMMANDS = _subparsers()


def test_every_subcommand_module_registers_a_subcommand():
    for name in SUBCOMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        import_module(name).register(sub)
        assert set(sub.choices) and set(sub.choices) <= set(SUBCOMMANDS), name


def _flags(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in p._actions for s in a.option_strings}


def _base(name: str, p: argparse.ArgumentParser, tmp: Path, rows: Path) -> list[str]:
    """Arguments that satisfy the subcommand's required ones with sound values, so the
    case's own bad argument is what fails."""
    known = {"input": str(rows), "out": str(tmp / f"{name}-out"), "draft_vocab_size": "8",
             "dir": str(tmp / f"{name}-dir")}
    argv: list[str] = []
    for a in p._actions:
        if not a.option_strings and a.dest not in ("help",) and a.nargs != argparse.SUPPRESS:
            argv.append(known.get(a.dest, str(tmp / f"missing-{a.dest}")))
        elif a.required:
            argv += [a.option_strings[0], known.get(a.dest, str(tmp / f"missing-{a.dest}"))]
    if "--port" in _flags(p):
        argv += ["--port", "0"]  # tests run side by side: never the default port
    return argv


def _cases(name: str, p: argparse.ArgumentParser, tmp: Path, rows: Path) -> list[tuple[str, list[str], Any]]:
    """``(label, argv, exit code or codes)`` of each bad invocation of subcommand ``name``
    (an engine that cannot run here may be a usage error or a failure)."""
    flags = _flags(p)
    base = _base(name, p, tmp, rows)
    cases = [("unknown flag", [*base, "--no-such-flag"], 2)]
    for flag, a in flags.items():
        if a.type in (int, float) and flag == a.option_strings[0]:
            cases.append((f"{flag} not a number", [*base, flag, "many"], 2))
    if "--model" in flags:
        cases.append(("missing model", [*base, "--model", str(tmp / "no-model")], 2))
    if "--device" in flags and not torch.cuda.is_available():
        cases.append(("--device cuda without CUDA", [*base, "--device", "cuda"], 2))
        cases.append(("--device not a device", [*base, "--device", "gpu"], 2))
    if "--engine" in flags and not torch.cuda.is_available():
        cases.append(("--engine sglang without a GPU", [*base, "--engine", "sglang"], (1, 2)))
    if "--engine-arg" in flags:
        cases.append(("unknown --engine-arg", [*base, "--engine-arg", "foo=1"], 2))
        cases.append(("--engine-arg without =", [*base, "--engine-arg", "foo"], 2))
        # serve listens before it loads: what only the load finds is a failure there (1)
        cases.append(("flash attention without the package",
                      [*base, "--engine-arg", "attn_implementation=flash_attention_2"], 1 if name == "serve" else 2))
    if "--aux-layers" in flags:
        cases.append(("negative --aux-layers", [*base, "--aux-layers", "-1,2,3"], 1 if name == "serve" else 2))
        cases.append(("--aux-layers not numbers", [*base, "--aux-layers", "a,b,c"], 2))
    if "--port" in flags:
        cases.append(("--port 99999", [*base, "--port", "99999"], 2))
        cases.append(("--port -1", [*base, "--port", "-1"], 2))
    ro = readonly_dir(tmp)
    for flag in ("--out",):
        if flag in flags:
            cases.append((f"{flag} in a read-only folder", [*base, flag, str(ro / "x" / "out.safetensors")], 2))
    for flag in ("--input", "--data", "--vocab", "--token-file", "--tokenizer"):
        if flag in flags:
            cases.append((f"{flag} missing", [*base, flag, str(tmp / "no-such-file.jsonl")], 2))
    if name == "make-tiny-model":
        cases.append(("DIR in a read-only folder", [str(ro / "tiny"), *base[1:]], 2))
    if name == "verify":
        cases.append(("verify a folder that is not a dump", [str(tmp)], 1))
    return cases


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_no_subcommand_prints_a_traceback_on_bad_arguments(name, tmp_path, tiny_model_dir):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    p = SUBCOMMANDS[name]
    failures = []
    for label, argv, code in _cases(name, p, tmp_path, rows):
        r = run_cli(name, *argv)
        text = r.stdout + r.stderr
        said = ("error" in r.stderr) or "problem:" in r.stdout  # verify reports on stdout
        if "Traceback" in text or r.returncode not in (code if isinstance(code, tuple) else (code,)) or not said:
            failures.append(f"{label}: exit {r.returncode} (want {code}):\n{text[-1500:]}")
    assert not failures, f"eagle3-target {name}:\n" + "\n".join(failures)
