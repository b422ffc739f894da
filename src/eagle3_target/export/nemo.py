"""Our dump as NeMo Automodel's EAGLE-3 offline cache, format version 2 (nemo-automodel
0.7.0, ``nemo_automodel/components/datasets/llm/eagle3_cache.py``; read by
``CachedEagle3Dataset``, used by the recipe through ``recipe_args.cached_target_path``).

Layout of an export folder::

    shard-%06d.safetensors          ``--shard-size`` samples each, stacked along dim 0
    target_embeddings.safetensors   ``weight [V,H] fp32``, the target's input embeddings
    manifest.json                   written last: the cache is readable only when complete
    eagle3-export.json              our sidecar (sha256 of every file)

Each sample is what NeMo's own producer (``precompute_eagle3``: ``HFEagle3TargetModel``
then ``_compute_target_distribution``) gives for the same tokens padded on the right to
``seq_length`` with the tokenizer's pad id: ``input_ids``, ``loss_mask`` ``[S]`` int64
shifted left by one with only the last column zeroed (NeMo's shift), ``attention_mask``
unshifted, ``aux_hidden_states [S,3H]``, ``position_mask [S,1]`` bool and
``target_probs [S,Vd]`` (softmax of the shifted logits over the draft vocabulary), the
float fields in the manifest's ``dtype``. Two kinds of position no loss reads differ:
on pads our aux is zero where NeMo's holds the target's states on pad tokens, and from
each sample's last real token on our ``target_probs`` is uniform (zero logits, the
contract's zero tail) where NeMo's comes from pad-token logits; ``position_mask`` is
False on all of them in both.

A draft vocabulary is required (the cache stores probabilities over it), so is
``--model`` (the embeddings the draft starts from, and the pad id).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from eagle3_target.contract import shift_left_with_zero, zero_tail
from eagle3_target.export import NEMO_SHARD_SIZE
from eagle3_target.export.files import ExportFiles, ExportSummary, dump_identity
from eagle3_target.export.source import DumpSource

__all__ = ["export_nemo", "NEMO_FORMAT_VERSION", "EMBEDDINGS_FILE", "DTYPES", "shard_name"]

NEMO_FORMAT_VERSION = 2
EMBEDDINGS_FILE = "target_embeddings.safetensors"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""NeMo's cache dtype names (its ``DTYPE_MAP``)."""
_OURS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}



def shard_name(j: int) -> str:
    return f"shard-{j:06d}.safetensors"


def export_nemo(dump: str | Path, out: str | Path, *, vocab: str | None, model: str | None,
                seq_length: int | None = None, shard_size: int | None = None,
                dtype: str | None = None, trust_existing: bool = False) -> ExportSummary:
    """Writes (or resumes, or repairs) the NeMo offline cache of ``dump`` into ``out``.

    ``seq_length``: every sample's padded length (default: the dump's ``max_length``, or
    its longest sample); ``dtype``: ``bf16|fp16|fp32`` (default: the dump's). Raises
    ValueError before writing anything on bad input."""
    t0 = time.perf_counter()
    src = DumpSource(dump, model=model, vocab=vocab, need_vocab=True, need_model=True, flag="--to nemo")
    cfg = src.config
    if cfg["mode"] not in ("draft", "logits", "hidden"):
        raise ValueError(f"--to nemo cannot express a {cfg['mode']!r} dump")
    n = len(src)
    lengths = [src.length(i) for i in range(n)]
    longest = max(lengths, default=1)
    s_len = int(seq_length or cfg.get("max_length") or longest)
    if s_len < longest:
        raise ValueError(f"--seq-length {s_len} is shorter than the longest sample ({longest} tokens); NeMo's "
                         f"cache pads every sample to one length: pass --seq-length {longest} or more")
    shard_size = NEMO_SHARD_SIZE if shard_size is None else shard_size
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"--shard-size must be a positive integer, got {shard_size!r}")
    dtype = dtype or _OURS.get(cfg["dtype"], "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    pad_id = src.pad_id()
    mapping = src.mapping
    head = None
    if cfg["mode"] == "hidden":
        from eagle3_target.dump.format import LM_HEAD_FILE, load_lm_head

        head = load_lm_head(src.path / LM_HEAD_FILE)
    manifest = {
        "target_model": str(model), "target_vocab_size": int(cfg["vocab_size"]),
        "draft_vocab_size": int(mapping.draft_vocab_size), "seq_length": s_len, "dtype": dtype,
        "num_samples": n, "shard_size": shard_size, "target_probs_topk": 0,
        "aux_hidden_dim": 3 * int(cfg["hidden_size"]), "aux_layer_ids": list(cfg["aux_layer_ids"]),
        "selected_token_ids": mapping.selected_token_ids.tolist(),
        "input_data": ",".join(d["name"] for d in cfg["data"]), "split": None, "shuffle_seed": 0,
        "mask_reasoning_content": bool(cfg.get("mask_reasoning")), "mask_generation_prompt": False,
    }
    settings = {"seq_length": s_len, "shard_size": shard_size, "dtype": dtype, "pad_id": pad_id,
                "vocab_mapping_id": mapping.mapping_id}
    files = ExportFiles(out, to="nemo", source=dump_identity(dump), settings=settings,
                        trust_existing=trust_existing)
    try:
        if not files.done(EMBEDDINGS_FILE):
            files.write_tensors(EMBEDDINGS_FILE, {"weight": src.input_embeddings().to(torch.float32)})
        for j, first in enumerate(range(0, n, shard_size)):
            if files.done(shard_name(j)):
                continue
            rows = [_sample(src.sample(i), s_len, pad_id, mapping, head, DTYPES[dtype])
                    for i in range(first, min(n, first + shard_size))]
            # [n,S,...] written as n pieces of [1,S,...]: the shard is never stacked in memory
            files.write_tensors(shard_name(j), {k: [r[k][None] for r in rows] for k in rows[0]})
        if not files.done("manifest.json"):  # last: NeMo opens the cache by its manifest
            body = json.dumps({"format_version": NEMO_FORMAT_VERSION, **manifest}, indent=2, sort_keys=True)
            files.write_bytes("manifest.json", body.encode())
        files.finish()
    finally:
        files.close()
        src.close()
    return files.summary(n, sum(lengths), time.perf_counter() - t0)


def _sample(raw: dict[str, torch.Tensor], s_len: int, pad_id: int, mapping: Any, head: Any,
            dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One stored sample (``L`` tokens) as NeMo's cache row of ``s_len``: the keys in the
    order NeMo's ``write_shard`` gives them."""
    from eagle3_target.vocab import compute_target_distribution

    ids = raw["input_ids"].to(torch.int64)
    n = ids.shape[0]
    padded = torch.full((1, s_len), pad_id, dtype=torch.int64)
    padded[0, :n] = ids
    attn = torch.zeros(s_len, dtype=torch.int64)
    attn[:n] = 1
    lmask = torch.zeros((1, s_len), dtype=torch.int64)
    lmask[0, :n] = raw["loss_mask"].to(torch.int64)
    shifted_mask = shift_left_with_zero(lmask)  # NeMo's shift: last column zero
    aux = torch.zeros((s_len, raw["aux_hidden_states"].shape[-1]), dtype=dtype)
    aux[:n] = raw["aux_hidden_states"].to(dtype)
    if "target_probs" in raw:  # a draft-mode dump: already over this vocabulary (checked by id)
        vd = raw["target_probs"].shape[-1]
        probs = torch.full((s_len, vd), 1.0 / vd, dtype=torch.float32)
        probs[:n] = raw["target_probs"]
        pmask = torch.zeros((s_len, 1), dtype=torch.bool)
        pmask[:n, 0] = raw["position_mask"].reshape(-1)
    else:
        logits = raw["logits"] if "logits" in raw else zero_tail(head(raw["hidden_states"])[None], [n])[0]
        full = torch.zeros((1, s_len, logits.shape[-1]), dtype=torch.float32)
        full[0, :n] = logits.float()
        probs, pmask = compute_target_distribution(full, mapping.selected_token_ids,
                                                   mapping.selected_token_mask, shifted_mask)
        probs, pmask = probs[0], pmask[0]
    return {"input_ids": shift_left_with_zero(padded)[0], "attention_mask": attn, "loss_mask": shifted_mask[0],
            "aux_hidden_states": aux, "position_mask": pmask.to(torch.bool), "target_probs": probs.to(dtype)}
