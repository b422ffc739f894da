"""What an export reads: :class:`DumpSource`, a finished dump with the inputs a trainer's
format needs beyond it, each checked before anything is written.

A dump stores the supervision; the trainers also want things a dump keeps only by
reference: the draft vocabulary (the dump records its ``vocab_mapping_id``; ``--vocab``
gives the ids, checked against that id), the target's input embeddings and its
tokenizer's pad id (``--model``, checked against the dump's ``model_sha256``), and, for
a dump written without ``--with-prenorm``, the final state before the final norm
(recomputed from ``--model`` one sample at a time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from eagle3_target.dump.format import model_fingerprint
from eagle3_target.dump.reader import Eagle3Dataset

__all__ = ["DumpSource", "load_input_embeddings"]


class DumpSource:
    """A complete dump, opened for an export.

    Args:
        dump: the dump folder.
        model: the dump's model folder (embeddings, pad id, recomputed pre-norm state).
        vocab: a draft vocabulary file (``eagle3-target vocab``).
        need_prenorm, need_vocab, need_model: what the format needs; ``flag`` names
            the ``--to`` value in the messages.
    """

    def __init__(self, dump: str | Path, *, model: str | None = None, vocab: str | None = None,
                 need_prenorm: bool = False, need_vocab: bool = False, need_model: bool = False,
                 flag: str = "--to speculators"):
        self.path = Path(dump)
        if not self.path.is_dir():
            raise ValueError(f"{self.path}: no such dump folder")
        self.ds = Eagle3Dataset(self.path)
        self.config: dict[str, Any] = self.ds.config
        self.prenorm_stored = bool(self.config.get("with_prenorm"))
        if need_prenorm and not self.prenorm_stored and model is None:
            raise ValueError(f"{flag} needs the final state before the final norm, which {self.path} does not "
                             f"hold: rerun the dump with --with-prenorm, or pass --model DIR (the dump's "
                             f"model) to recompute it")
        if (need_model or (need_prenorm and not self.prenorm_stored)) and model is None:
            raise ValueError(f"{flag} needs --model DIR, the model the dump was made with (for its input "
                             f"embeddings and its tokenizer's pad id)")
        self.model = model
        if model is not None:
            if not Path(model).is_dir():
                raise ValueError(f"--model {model}: no such model folder")
            recorded = str(self.config.get("model_sha256"))
            if not recorded.startswith("server:") and model_fingerprint(model) != recorded:
                raise ValueError(f"--model {model} is not the model {self.path} was made with (its config and "
                                 f"weight files differ from the ones the dump recorded)")
        self.mapping = None
        if vocab is None and need_vocab:
            raise ValueError(f"{flag} needs the draft vocabulary: pass --vocab mapping.safetensors (the file "
                             f"`eagle3-target vocab` wrote; the one `dump --vocab` used for a draft-mode dump)")
        if vocab is not None:
            from eagle3_target.vocab import VocabMapping

            if not Path(vocab).is_file():
                raise ValueError(f"--vocab {vocab}: no such file")
            self.mapping = VocabMapping.load(vocab)
            if self.mapping.target_vocab_size != self.config["vocab_size"]:
                raise ValueError(f"--vocab maps a vocabulary of {self.mapping.target_vocab_size} tokens but the "
                                 f"dump's target has {self.config['vocab_size']}")
            used = self.config.get("vocab_mapping_id")
            if used is not None and used != self.mapping.mapping_id:
                raise ValueError(f"--vocab {vocab} is not the draft vocabulary the dump used (mapping id "
                                 f"{self.mapping.mapping_id}, the dump recorded {used})")
        self._target: Any = None

    def __len__(self) -> int:
        return len(self.ds)

    def length(self, i: int) -> int:
        """Sample ``i``'s tokens (from the shard offsets; no tensor is read)."""
        return self.ds.length(i)

    def sample(self, i: int, fields: Sequence[str] | None = None, *, prenorm: bool = False
               ) -> dict[str, torch.Tensor]:
        """Sample ``i`` as stored (:meth:`Eagle3Dataset.raw`: ``input_ids``/``loss_mask``
        unshifted, the mode's fields; only ``fields`` when given); with ``prenorm``,
        ``final_prenorm [L,H]`` from the dump or recomputed from ``--model``."""
        if fields is not None and prenorm and not self.prenorm_stored:
            fields = [f for f in fields if f != "final_prenorm"]
        raw = self.ds.raw(i, fields)
        if prenorm and "final_prenorm" not in raw:
            ids = raw["input_ids"][None].to(torch.int64)
            ones = torch.ones_like(ids)
            _, pre = self._recompute_target().generate_prenorm(ids, ones, ones)
            raw["final_prenorm"] = pre[0].to(raw["aux_hidden_states"].dtype).cpu()
        return raw

    def _recompute_target(self) -> Any:
        if self._target is None:
            from eagle3_target import Eagle3TargetModel

            self._target = Eagle3TargetModel.from_pretrained(
                self.model, engine="hf", dtype=self.config["dtype"], aux_layer_ids=self.config["aux_layer_ids"])
        return self._target

    def input_embeddings(self) -> torch.Tensor:
        """``[V,H]`` the target's input embedding weight, read from ``--model``."""
        return load_input_embeddings(str(self.model))

    def pad_id(self) -> int:
        """The pad id the trainer's own padding uses: the tokenizer's (0 without one)."""
        from eagle3_target.data.tokenizer import load_tokenizer

        pad = getattr(load_tokenizer(str(self.model)), "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def close(self) -> None:
        if self._target is not None:
            self._target.close()
            self._target = None


def load_input_embeddings(model_dir: str) -> torch.Tensor:
    """``[V,H]`` input embedding weight of a local model, without loading the rest: the
    model is built on the meta device to learn the weight's name, which is then read
    from the safetensors files (a full load when no file has it under that name)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    weight = meta.get_input_embeddings().weight
    names = [n for n, p in meta.named_parameters(remove_duplicate=False) if p is weight]
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            keys = set(h.keys())
            for n in names:
                if n in keys:
                    return h.get_tensor(n)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    return model.get_input_embeddings().weight.detach()
