"""Inputs shared by several test modules: padded id batches, sample-chat files and a
draft vocabulary built from them; and a dump folder's files, for byte comparisons."""

from __future__ import annotations

from pathlib import Path

import torch


def files_of(d: Path) -> dict[str, bytes]:
    """A dump folder's files by name, bytes and all (its hidden lock and temp files left out)."""
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if not p.name.startswith(".")}


def right_padded_batch(lengths: list[int], vocab: int, seed: int = 0, pad_id: int = 0):
    """``(input_ids, attention_mask)`` each ``[B, max(lengths)] int64``, right-padded."""
    g = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), s), generator=g)
    mask = (torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]).to(torch.int64)
    return torch.where(mask.bool(), ids, torch.full_like(ids, pad_id)), mask


def first_sample_chats(folder: Path, n: int) -> Path:
    """Writes the first ``n`` bundled sample chats to ``folder/chats.jsonl``."""
    from eagle3_target.data.rows import sample_data_path

    p = folder / "chats.jsonl"
    p.write_text("\n".join(sample_data_path().read_text().splitlines()[:n]) + "\n")
    return p


def draft_vocab_file(folder: Path, tok, data_file: Path, target_vocab_size: int, specials: list[int],
                     size: int = 200) -> Path:
    """A draft vocabulary of ``size`` tokens chosen from the supervised tokens of
    ``data_file``, saved as ``folder/vocab.safetensors``."""
    from eagle3_target.data.chat import ChatEncoder
    from eagle3_target.data.samples import iter_samples, iter_supervised_ids
    from eagle3_target.vocab import build_vocab_mapping

    samples = [s for s in iter_samples([data_file], ChatEncoder(tok)) if hasattr(s, "input_ids")]
    p = folder / "vocab.safetensors"
    build_vocab_mapping(list(iter_supervised_ids(samples)), size, specials,
                        target_vocab_size=target_vocab_size).save(p)
    return p
