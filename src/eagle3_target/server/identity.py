"""What makes two servers the same target: a fingerprint of the model folder's weights
and of its tokenizer files, reported on ``/v1/model_info`` so that a client spread over
several servers refuses one that serves another model of the same shapes (a base and
its fine-tune have identical configs and file sizes).

Hashing every weight would cost minutes on a large model, so the weights are sampled:
each weight file's name, size and the first and last :data:`SAMPLE_BYTES` of its
tensors (a fine-tune changes the embedding and the head, which sit at the ends of the
files the usual writers produce). Paths are not part of it: the same checkpoint copied
to two machines is the same target.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__all__ = ["folder_identity", "SAMPLE_BYTES", "WEIGHT_SUFFIXES", "TOKENIZER_GLOBS"]

SAMPLE_BYTES = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
TOKENIZER_GLOBS = ("tokenizer*", "*.tiktoken", "vocab.*", "merges.txt", "spiece.model",
                   "special_tokens_map.json", "added_tokens.json", "chat_template*")
"""The files a tokenizer (and its chat template) is read from."""


def _sample(path: Path, h: "hashlib._Hash") -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}\n".encode())
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        if size > 2 * SAMPLE_BYTES:
            f.seek(size - SAMPLE_BYTES)
            h.update(f.read(SAMPLE_BYTES))


@functools.lru_cache(maxsize=8)
def folder_identity(path: str) -> dict[str, str | None]:
    """``{"model_sha256", "tokenizer_sha256"}`` of a local model folder (None for a part
    that is not there, or for a path that is not a folder)."""
    d = Path(path)
    if not path or not d.is_dir():
        return {"model_sha256": None, "tokenizer_sha256": None}
    model = hashlib.sha256()
    if (d / "config.json").is_file():
        model.update((d / "config.json").read_bytes())
    weights = sorted(p for p in d.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    for p in weights:
        _sample(p, model)
    tok = hashlib.sha256()
    names = sorted({p for g in TOKENIZER_GLOBS for p in d.glob(g) if p.is_file()})
    for p in names:
        tok.update(f"{p.name}\n".encode() + p.read_bytes())
    return {"model_sha256": model.hexdigest() if weights else None,
            "tokenizer_sha256": tok.hexdigest() if names else None}
