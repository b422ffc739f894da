"""``eagle3-target verify DIR``: check a dump folder against its manifests
(:mod:`eagle3_target.dump.verify`), or an export folder against its sidecar
(:func:`eagle3_target.export.files.verify_export`); exit 0 when it is sound."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def _cmd_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from eagle3_target.dump.verify import verify_dump
    from eagle3_target.export.files import SIDECAR, verify_export

    if (Path(args.dir) / SIDECAR).is_file():  # a trainer-format export (`eagle3-target export`)
        report = verify_export(args.dir, hash_files=not args.no_hash)
    else:
        report = verify_dump(args.dir, hash_shards=not args.no_hash)
    print("\n".join(report.lines))
    for p in report.problems:
        print(f"problem: {p}")
    return 0 if report.ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a dump folder against its manifest(s); exit 0 when sound",
                       description="Checks that every manifest accounts for its rows and shard files "
                                   "(no unlisted shard, no gap, counts that agree) and every shard: sha256 "
                                   "and size, header, dtypes and shapes, offsets and row indices, token "
                                   "counts, NaN/Inf. Exit code 0 when all is well, 1 otherwise; rerunning "
                                   "the same dump command repairs what it reports.")
    p.add_argument("dir", help="dump folder")
    p.add_argument("--no-hash", action="store_true",
                   help="skip the sha256 of every file: checks structure and counts only, so a flipped bit "
                        "inside tensor data goes unnoticed")
    p.set_defaults(func=_cmd_verify)
