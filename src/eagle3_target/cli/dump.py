"""``eagle3-target dump``: chat data -> sharded safetensors of EAGLE-3 supervision,
resumable (:func:`eagle3_target.dump.run_dump`). Every default comes from
:class:`~eagle3_target.dump.config.DumpConfig`."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from eagle3_target.cli.common import add_model_args, check_writable, engine_options, parse_aux_layers
from eagle3_target.data.samples import TRUNCATION_WARN_SHARE
from eagle3_target.dump.config import RENDER_CHOICES, DumpConfig, default
from eagle3_target.dump.modes import MODES
from eagle3_target.wire import TOKEN_ENV

if TYPE_CHECKING:
    from eagle3_target.dump.summary import StageClock

__all__ = ["register", "config_from_args", "run"]


def config_from_args(args: argparse.Namespace) -> DumpConfig:
    """The :class:`DumpConfig` the ``dump`` subcommand runs for parsed ``args``."""
    return DumpConfig(
        out=args.out, data=args.data or default("data"), mode=args.mode, model=args.model,
        engine=args.engine, server=[u for u in args.server.split(",") if u] if args.server else None,
        tokenizer=args.tokenizer, token_file=args.token_file, device=args.device, dtype=args.dtype,
        aux_layer_ids=parse_aux_layers(args.aux_layers),
        engine_args=engine_options(args), vocab=args.vocab,
        with_prenorm=args.with_prenorm, max_length=args.max_length or None, max_row_mb=args.max_row_mb,
        mask_reasoning=args.mask_reasoning,
        batch_tokens=args.batch_tokens, shard_size_mb=args.shard_size_mb, num_shards=args.num_shards,
        shard_index=args.shard_index, strict=args.strict, trust_existing=args.trust_existing,
        writer_threads=args.writer_threads, prefetch=args.prefetch, progress=args.progress,
        pin_threads=args.pin_threads, render=args.render)


def _kept(args: argparse.Namespace) -> str:
    return f"the finished shards in {args.out} are kept; run the same command again to continue"


def run(args: argparse.Namespace, *, clock: StageClock | None = None) -> int:
    """What ``eagle3-target dump`` does with parsed ``args``; ``clock`` times the main
    thread's stages (``scripts/gpu/cli_dump.py``)."""
    from eagle3_target.cli import report_partial
    from eagle3_target.dump.job import run_dump

    cfg = config_from_args(args)
    check_writable(cfg.out, "--out", folder=True)
    try:
        summary = run_dump(cfg, clock=clock)
    except (OSError, RuntimeError) as e:  # a full disk, a lost server: what is done stays done
        return report_partial("dump", e, _kept(args) if cfg.manifest_path().exists() else "nothing was written")
    print("\n".join(summary.lines()))
    if summary.complete and summary.samples == 0:
        print(f"eagle3-target dump: error: the dump stores no sample: every row was skipped (the reasons "
              f"are above); fix the data, the tokenizer or the settings", file=sys.stderr)
        return 1
    return 0 if summary.complete else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dump", help="write EAGLE-3 supervision for chat data to sharded safetensors (resumable)",
        description="Renders chat data (JSONL/Parquet; OpenAI messages or ShareGPT conversations) "
                    "with the model's chat template, runs the target and writes shards of "
                    "safetensors plus a manifest. Rerun the same command after an interruption "
                    "to continue; finished shards are checked, never rewritten.")
    add_model_args(p)
    p.add_argument("--server", default=None, help="URL[,URL...] of eagle3-target servers (instead of --model)")
    p.add_argument("--token-file", default=None,
                   help=f"with --server: a file whose first line is the access token (else ${TOKEN_ENV}, "
                        f"or http://user:TOKEN@host:port)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    p.add_argument("--data", nargs="+", default=None,
                   help="chat files, .jsonl or .parquet (default: the bundled sample chats)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mode", default=default("mode"), choices=list(MODES),
                   help="; ".join(f"{m.name}: {m.help}" for m in MODES.values()) + f" (default {default('mode')})")
    p.add_argument("--vocab", default=None, help="draft vocab mapping (required for --mode draft)")
    p.add_argument("--with-prenorm", action="store_true",
                   help="also store final_prenorm, the final state before the final norm (needed by "
                        "`export --to speculators`; one more target forward per batch)")
    p.add_argument("--max-length", type=int, default=default("max_length"),
                   help=f"keep the first N tokens of each rendered chat (default {default('max_length')}; "
                        f"0: never truncate, and a row longer than the model's context is skipped); rows cut "
                        f"and the supervised tokens lost are counted in the summary and the manifest, with a "
                        f"warning above {TRUNCATION_WARN_SHARE:.0%} and an error under --strict")
    p.add_argument("--max-row-mb", type=float, default=default("max_row_mb"),
                   help=f"skip (or with --strict refuse) a data row larger than this many MiB "
                        f"(default {default('max_row_mb'):g})")
    p.add_argument("--mask-reasoning", action="store_true", help="leave <think> text out of the loss mask")
    p.add_argument("--batch-tokens", type=int, default=default("batch_tokens"),
                   help=f"padded tokens per target forward (default {default('batch_tokens')})")
    p.add_argument("--shard-size-mb", type=float, default=default("shard_size_mb"),
                   help=f"close a shard after this many MiB (default {default('shard_size_mb'):g})")
    p.add_argument("--num-shards", type=int, default=default("num_shards"), help=f"number of independent workers (default {default('num_shards')})")
    p.add_argument("--shard-index", type=int, default=default("shard_index"),
                   help=f"this worker (rows r with r %% K == i; default {default('shard_index')})")
    p.add_argument("--strict", action="store_true",
                   help="fail before writing on any malformed, unsupervised or truncated row")
    p.add_argument("--trust-existing", action="store_true",
                   help="on a rerun, check finished shards by size only (no re-hash)")
    p.add_argument("--writer-threads", type=int, default=default("writer_threads"),
                   help="shards written and hashed in parallel, commits in order (default: half the cores, 2-8)")
    p.add_argument("--pin-threads", type=int, default=default("pin_threads"),
                   help="on a GPU, threads that pin the host copy pool (0: torch's default cudaHostAlloc)")
    p.add_argument("--prefetch", type=int, default=default("prefetch"),
                   help="batches computed ahead: requests in flight with --server (default 2); else 1, "
                        "the target's forwards on an engine thread of their own, or 0, on the main thread")
    p.add_argument("--render", default=default("render"), choices=RENDER_CHOICES,
                   help="where the chat template runs: a thread, a child process that takes over once "
                        "loaded (keeps the GIL free for a GPU engine), or auto (process on a GPU)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.set_defaults(func=run, on_interrupt=_kept)
