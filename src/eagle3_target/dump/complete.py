"""A dump's configuration record, and the rerun of a complete dump that needs no target.

Owns :func:`config_record` (the ``config`` a manifest holds: what a rerun must match to
continue) and :func:`finished_without_target`: a rerun of a dump that is already
complete checks its shards and reports it without loading the model, which on a large
target takes minutes and then has no row to compute. The record's fields that only the
loaded target knows (aux ids, dtype, hidden and vocabulary sizes) are taken from the
record unless this run names them (``--aux-layers``, ``--dtype``); the model's config and
weight files are in ``model_sha256``. Anything that differs, or a shard that fails its
check, sends the rerun down the full path, which explains or repairs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from eagle3_target.data.chat import ChatEncoder
from eagle3_target.data.tokenizer import tokenizer_fingerprint
from eagle3_target.dump.config import DumpConfig, default
from eagle3_target.dump.integrity import manifest_problems
from eagle3_target.dump.format import FORMAT, LM_HEAD_FILE, check_shard_file, model_fingerprint, sha256_file
from eagle3_target.dump.summary import DumpSummary, logits_bytes_per_token, summary_json
from eagle3_target.tiny import resolve_model

__all__ = ["config_record", "finished_without_target", "summary_of", "TARGET_FIELDS"]

TARGET_FIELDS = ("aux_layer_ids", "dtype", "hidden_size", "vocab_size")
"""The record's fields that only the loaded target knows."""


def config_record(cfg: DumpConfig, data: Sequence[Path], tokenizer_sha: str, model_sha: str, mapping: Any,
                  use_template_mask: bool, target: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``config``; ``target`` holds :data:`TARGET_FIELDS`."""
    return {
        "format": FORMAT, "mode": cfg.mode,
        "data": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in data],
        "tokenizer_sha256": tokenizer_sha, "model_sha256": model_sha,
        "engine": "server" if cfg.server else cfg.engine,
        "aux_layer_ids": [int(i) for i in target["aux_layer_ids"]],
        "dtype": target["dtype"], "hidden_size": target["hidden_size"], "vocab_size": target["vocab_size"],
        "vocab_mapping_id": mapping.mapping_id if mapping is not None else None,
        "draft_vocab_size": mapping.draft_vocab_size if mapping is not None else None,
        "max_length": cfg.max_length, "mask_reasoning": cfg.mask_reasoning,
        "mask_source": "template" if use_template_mask else "turns",
        "batch_tokens": cfg.batch_tokens, "shard_size_mb": cfg.shard_size_mb,
        "num_shards": cfg.num_shards, "shard_index": cfg.shard_index,
        # Recorded only when changed or set, so that dumps with the defaults keep their bytes.
        **({"max_row_mb": cfg.max_row_mb} if cfg.max_row_mb != default("max_row_mb") else {}),
        **({"with_prenorm": True} if cfg.with_prenorm else {}),
    }


def summary_of(cfg: DumpConfig, manifest: dict[str, Any], **run: Any) -> DumpSummary:
    """The :class:`DumpSummary` of ``manifest``, with this run's figures ``run``."""
    s = summary_json(manifest)
    cut = s.get("truncated", {})
    return DumpSummary(
        out=str(cfg.out), mode=cfg.mode, complete=bool(manifest["complete"]), samples=s["samples"],
        tokens=s["tokens"], supervised_tokens=s["supervised_tokens"], bytes=s["bytes"],
        shards=len(manifest["shards"]), skipped=s["skipped"], examples=s["examples"],
        logits_bytes_per_token=logits_bytes_per_token(manifest["config"]), max_length=cfg.max_length,
        truncated_rows=cut.get("rows", 0), truncated_supervised=cut.get("supervised_tokens_lost", 0), **run)


def finished_without_target(cfg: DumpConfig, existing: dict[str, Any], data: Sequence[Path], tokenizer: Any,
                            mapping: Any, say: Callable[[str], None]) -> DumpSummary | None:
    """The summary of a complete dump whose record this run matches and whose shards
    pass their check, or None when the full path must look (it explains or repairs)."""
    from eagle3_target.engines.common import parse_dtype

    old = existing.get("config") or {}
    if not existing.get("complete") or cfg.server or not all(k in old for k in TARGET_FIELDS):
        return None
    shards = existing["shards"]
    say(f"{cfg.out} holds a complete dump ({len(shards)} shards, "
        f"{sum(e['num_samples'] for e in shards):,} samples); checking it without loading the target")
    target = {k: old[k] for k in TARGET_FIELDS}
    if cfg.aux_layer_ids is not None:
        target["aux_layer_ids"] = list(cfg.aux_layer_ids)
    if cfg.dtype is not None and parse_dtype(cfg.dtype) is not None:
        target["dtype"] = str(parse_dtype(cfg.dtype)).replace("torch.", "")
    encoder = ChatEncoder(tokenizer, max_length=cfg.max_length, mask_reasoning=cfg.mask_reasoning,
                          vocab_size=target["vocab_size"])
    record = config_record(cfg, data, tokenizer_fingerprint(tokenizer), model_fingerprint(resolve_model(cfg.model)),
                           mapping, encoder.use_template_mask, target)
    if record != old:
        return None
    out = Path(cfg.out)
    if manifest_problems(existing, out, cfg.manifest_path().name):  # unaccounted rows or files: a repair
        return None
    if any(check_shard_file(out / e["file"], e, hash_it=not cfg.trust_existing) is not None for e in shards):
        return None
    head = existing.get("lm_head")
    if cfg.mode == "hidden" and (head is None or not (out / LM_HEAD_FILE).is_file()
                                 or sha256_file(out / LM_HEAD_FILE) != head["sha256"]):
        return None
    return summary_of(cfg, existing)
