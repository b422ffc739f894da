"""``eagle3-target regenerate``: the target answers chat data, written as OpenAI
``messages`` rows for ``vocab`` and ``dump`` (:func:`eagle3_target.regen.run_regenerate`).
Every default comes from :class:`~eagle3_target.regen.config.RegenConfig`."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from eagle3_target.cli.common import check_writable, engine_options
from eagle3_target.regen.config import OUTPUT_FORMATS, TURNS, RegenConfig, default

__all__ = ["register", "config_from_args", "run", "parse_template_kwargs", "TOKEN_ENVS"]

TOKEN_ENVS = ("OPENAI_API_KEY", "EAGLE3_TARGET_TOKEN")
"""Where ``--server``'s bearer token is read from when ``--token`` is not given, in order."""


def parse_template_kwargs(items: list[str]) -> dict[str, Any]:
    """``["enable_thinking=true"]`` -> ``{"enable_thinking": True}`` (values parsed as
    JSON when they parse, else kept as strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--chat-template-kwarg {item!r}: expected KEY=VALUE, e.g. enable_thinking=true")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def config_from_args(args: argparse.Namespace) -> RegenConfig:
    """The :class:`RegenConfig` the ``regenerate`` subcommand runs for parsed ``args``."""
    token = args.token
    if token is None and args.server:
        token = next((os.environ[e] for e in TOKEN_ENVS if os.environ.get(e)), None)
    return RegenConfig(
        out=args.out, data=args.data or default("data"), model=args.model, engine=args.engine,
        server=args.server, served_model=args.served_model, tokenizer=args.tokenizer, device=args.device,
        dtype=args.dtype, engine_args=engine_options(args), turns=args.turns, samples=args.samples,
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
        chat_template_kwargs=parse_template_kwargs(args.chat_template_kwarg), max_context=args.max_context,
        keep_length=args.keep_length, batch_size=args.batch_size, shard_rows=args.shard_rows,
        output_format=args.format, max_row_mb=args.max_row_mb, strict=args.strict, timeout=args.timeout,
        retries=args.retries,
        token=token, progress=args.progress)


def run(args: argparse.Namespace) -> int:
    """What ``eagle3-target regenerate`` does with parsed ``args``."""
    from eagle3_target.regen import run_regenerate

    from eagle3_target.cli import report_partial

    cfg = config_from_args(args)
    check_writable(cfg.out, "--out", folder=True)
    try:
        summary = run_regenerate(cfg)
    except (OSError, RuntimeError) as e:  # a full disk, a server gone past the retries
        return report_partial("regenerate", e, "the finished shards are kept; run the same command again "
                                               "to continue")
    print("\n".join(summary.lines()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "regenerate", help="the target writes the assistant answers (messages rows for vocab and dump)",
        description="Answers chat data (JSONL/Parquet; OpenAI messages or ShareGPT) with the target, "
                    "through transformers, SGLang's offline Engine, or an OpenAI-compatible chat server, "
                    "and writes sharded OpenAI messages rows plus a manifest. Rerun the same command "
                    "after an interruption to continue; finished shards are checked, never rewritten.")
    p.add_argument("--model", default=None,
                   help="local model directory (default: the built-in tiny model); with --server, its tokenizer")
    p.add_argument("--engine", default=default("engine"), choices=["hf", "sglang"],
                   help="engine in this process (ignored with --server)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float32|bfloat16|float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel GPUs (--engine sglang)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="engine option (repeatable; VALUE parsed as JSON when it parses)")
    p.add_argument("--server", default=None, help="URL of an OpenAI-compatible chat server (instead of --model)")
    p.add_argument("--served-model", default=None, help="model name sent to the server (default: its first)")
    p.add_argument("--token", default=None,
                   help=f"bearer token for --server (default: ${TOKEN_ENVS[0]} or ${TOKEN_ENVS[1]})")
    p.add_argument("--timeout", type=float, default=default("timeout"), help="seconds per server request")
    p.add_argument("--retries", type=int, default=default("retries"),
                   help="retries per server request, with exponential backoff")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    p.add_argument("--data", nargs="+", default=None,
                   help="chat files, .jsonl or .parquet (default: the bundled sample chats)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--turns", default=default("turns"), choices=TURNS,
                   help="last: answer the conversation without its trailing assistant turn; "
                        "all: answer every assistant turn in order, later turns following the new answers")
    p.add_argument("--samples", type=int, default=default("samples"), help="answers per prompt, one row each")
    p.add_argument("--temperature", type=float, default=default("temperature"), help="0: greedy")
    p.add_argument("--top-p", type=float, default=default("top_p"))
    p.add_argument("--max-new-tokens", type=int, default=default("max_new_tokens"))
    p.add_argument("--seed", type=int, default=default("seed"), help="run seed; every answer's seed derives from it")
    p.add_argument("--chat-template-kwarg", action="append", default=[], metavar="KEY=VALUE",
                   help="chat template variable, e.g. enable_thinking=true (repeatable)")
    p.add_argument("--max-context", type=int, default=None,
                   help="prompt + answer tokens allowed (default: the model's max_position_embeddings)")
    p.add_argument("--keep-length", action="store_true",
                   help="keep answers cut by --max-new-tokens (finish_reason: length) instead of skipping them")
    p.add_argument("--batch-size", type=int, default=default("batch_size"),
                   help="prompts generated together (in process) or requests in flight (--server)")
    p.add_argument("--shard-rows", type=int, default=default("shard_rows"), help="input rows per output shard")
    p.add_argument("--format", default=default("output_format"), choices=OUTPUT_FORMATS, help="shard format")
    p.add_argument("--max-row-mb", type=float, default=default("max_row_mb"),
                   help="skip (and count) JSONL rows longer than this many MiB")
    p.add_argument("--strict", action="store_true", help="fail on any row that would be skipped")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.set_defaults(func=run)
