"""``eagle3-target export DUMP --to speculators|nemo --out DIR``: a finished dump in a
trainer's own offline format (:mod:`eagle3_target.export`), resumable and verified."""

from __future__ import annotations

import argparse

from eagle3_target.export import FORMATS, NEMO_SHARD_SIZE

__all__ = ["register", "run"]


def run(args: argparse.Namespace) -> int:
    from eagle3_target.cli import report_partial
    from eagle3_target.export import export

    kwargs = {"vocab": args.vocab, "model": args.model, "trust_existing": args.trust_existing}
    if args.to == "nemo":
        kwargs.update(seq_length=args.seq_length, shard_size=args.shard_size, dtype=args.cache_dtype)
    else:
        for flag, value in (("--seq-length", args.seq_length), ("--shard-size", args.shard_size),
                            ("--cache-dtype", args.cache_dtype)):
            if value is not None:
                raise ValueError(f"{flag} applies to --to nemo only")
    try:
        summary = export(args.to, args.dump, args.out, **kwargs)
    except (OSError, RuntimeError) as e:  # a full disk: what is done stays done
        return report_partial("export", e, f"the finished files in {args.out} are kept; run the same "
                                           f"command again to continue")
    print("\n".join(summary.lines()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a finished dump in a trainer's offline format (speculators, NeMo)",
        description="Converts a finished dump into the offline data a trainer reads with its own "
                    "code. Files are written atomically and recorded with their sha256 in "
                    "eagle3-export.json; rerun the same command after an interruption to continue "
                    "(recorded files are re-hashed, damaged ones rewritten).")
    p.add_argument("dump", help="dump folder (`eagle3-target dump --out`)")
    p.add_argument("--to", required=True, choices=list(FORMATS),
                   help="; ".join(f"{f.name}: {f.help}" for f in FORMATS.values()))
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--vocab", default=None,
                   help="draft vocabulary (`eagle3-target vocab`): required for nemo; speculators writes "
                        "it as d2t.npy/t2d.npy")
    p.add_argument("--model", default=None,
                   help="the dump's model folder: nemo takes its input embeddings and pad id; speculators "
                        "recomputes the pre-norm state from it for a dump without --with-prenorm")
    p.add_argument("--seq-length", type=int, default=None,
                   help="nemo: the length every sample is padded to (default: the dump's --max-length)")
    p.add_argument("--shard-size", type=int, default=None,
                   help=f"nemo: samples per shard (default {NEMO_SHARD_SIZE}; a shard is built in memory)")
    p.add_argument("--cache-dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="nemo: dtype of the float fields (default: the dump's)")
    p.add_argument("--trust-existing", action="store_true",
                   help="on a rerun, check recorded files by size only (no re-hash)")
    p.set_defaults(func=run)
