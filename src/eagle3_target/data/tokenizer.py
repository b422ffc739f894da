"""Tokenizer helpers: loading a local tokenizer (also without ``AutoTokenizer``'s
imports) and refusing a missing or empty one, checking it against a model's vocabulary,
naming its class, fingerprinting what a dump depends on, its special ids.

Why the checks: given a model folder without tokenizer files, transformers builds an
empty tokenizer (one token) without a word, and every later step fails with a message
about something else ("text tokenizes to nothing", "no chat template"); a tokenizer of
another model makes every row "token id out of range".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from eagle3_target.errors import InputError

__all__ = ["load_tokenizer", "tokenizer_class_name", "tokenizer_fingerprint", "special_token_ids",
           "TOKENIZER_FILES", "missing_tokenizer_files", "check_tokenizer_fits"]

TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",),
                   ("spiece.model",), ("tiktoken.model",), ("tokenizer.tiktoken",))
"""The files one of which (or pair of which) holds a tokenizer's vocabulary: fast
(``tokenizer.json``), SentencePiece, byte-level BPE, WordPiece, tiktoken."""


def missing_tokenizer_files(path: str | Path) -> str | None:
    """None when the folder ``path`` holds a tokenizer's vocabulary files, else a
    sentence saying which files were looked for and what the folder has."""
    d = Path(path)
    if not d.is_dir():
        return f"{path} is not a folder"
    if any(all((d / f).is_file() for f in group) for group in TOKENIZER_FILES):
        return None
    has = sorted(p.name for p in d.iterdir())
    wanted = ", ".join(" + ".join(g) for g in TOKENIZER_FILES)
    return (f"{path} has no tokenizer files (looked for {wanted}; it has "
            f"{', '.join(has[:8]) + (', ...' if len(has) > 8 else '') if has else 'nothing'})")


def load_tokenizer(path: str, tokenizer_class: str | None = None) -> Any:
    """The tokenizer of a local model directory (nothing is downloaded).

    ``tokenizer_class`` (``module:qualname``, see :func:`tokenizer_class_name`) loads
    that class directly instead of resolving it through ``AutoTokenizer``, whose
    resolution imports the model's configuration classes and torch (2.6 s against
    0.5 s here): what the dump's render process does with its parent's class.

    Raises :class:`InputError` naming the missing files when the folder has no
    tokenizer, and when what loads is empty."""
    missing = missing_tokenizer_files(path)
    if missing is not None:
        raise InputError(f"{missing}; copy the tokenizer files from the original checkpoint into it "
                         f"or pass --tokenizer DIR")
    try:
        tok = _load(path, tokenizer_class)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged or foreign file
        raise InputError(f"the tokenizer in {path} cannot be read ({type(e).__name__}: {e}); copy the "
                         f"tokenizer files from the original checkpoint") from None
    if len(tok) < 2:
        raise InputError(f"the tokenizer in {path} loads with {len(tok)} token(s): its files are empty or "
                         f"not a tokenizer transformers can read")
    return tok


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, where: str = "the tokenizer") -> None:
    """Raises :class:`InputError` when the tokenizer has token ids the model cannot embed
    (id >= ``vocab_size``): a tokenizer of another model, found before any row is read."""
    top = max(tokenizer.get_vocab().values(), default=-1)
    if top >= vocab_size:
        raise InputError(f"{where} has token ids up to {top} ({len(tokenizer)} tokens) but the model's "
                         f"vocabulary has {vocab_size}: it belongs to another model; pass the "
                         f"model's own tokenizer (--tokenizer DIR)")


def _load(path: str, tokenizer_class: str | None) -> Any:
    if tokenizer_class:
        import importlib

        module, _, name = tokenizer_class.partition(":")
        cls: Any = importlib.import_module(module)
        for part in name.split("."):
            cls = getattr(cls, part)
        return cls.from_pretrained(path, local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def tokenizer_class_name(tokenizer: Any) -> str:
    """``module:qualname`` of the tokenizer's class, for :func:`load_tokenizer`."""
    return f"{type(tokenizer).__module__}:{type(tokenizer).__qualname__}"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the vocabulary, the chat template and the special ids: what a dump's
    manifest records, and what the render process proves it loaded."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.get_chat_template()).encode())
    h.update(json.dumps(list(getattr(tokenizer, "all_special_ids", []))).encode())
    return h.hexdigest()


def special_token_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's special tokens (BOS/EOS/PAD/UNK and its additional special
    tokens), in the tokenizer's order, without duplicates."""
    seen: list[int] = []
    for t in getattr(tokenizer, "all_special_ids", []) or []:
        if t is not None and int(t) not in seen:
            seen.append(int(t))
    return seen
