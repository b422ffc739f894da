"""The dump's modes: what each stores per token and how it is computed from a target.

:data:`MODES` is the one table: the ``dump`` subcommand's ``--mode`` choices and help,
the configuration's checks, the shard writer's field list and the checker's expected
dtypes and widths all read it. Each mode computes, for a right-padded batch, exactly
what ``generate_batch`` gives for each sample alone: the contract's shift with each
row's own zero tail.

Imports no torch at module level (the command line reads the table to build its help).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

if TYPE_CHECKING:
    import torch

    from eagle3_target.contract import Eagle3TargetBatch, LMHead

__all__ = ["TargetSource", "FieldSpec", "ModeSpec", "MODES", "BASE_FIELDS", "PRENORM_FIELD",
           "stored_fields", "compute_prenorm"]


class TargetSource(Protocol):
    """What the dump needs from a target: :class:`~eagle3_target.Eagle3TargetModel`
    in process, or :class:`~eagle3_target.client.RemoteTarget` over the network."""

    aux_layer_ids: list[int]

    def generate_batch(self, input_ids: "torch.Tensor", attention_mask: "torch.Tensor",
                       loss_mask: "torch.Tensor") -> "Eagle3TargetBatch": ...

    def generate_hidden(self, input_ids: "torch.Tensor", attention_mask: "torch.Tensor",
                        loss_mask: "torch.Tensor") -> "tuple[torch.Tensor, torch.Tensor]": ...

    def lm_head(self) -> "LMHead": ...

    def close(self) -> None: ...

    # Optional: ``hidden_size``, ``vocab_size``, ``dtype`` (probed with a two-token forward
    # when absent), ``set_vocab_mapping(mapping)`` (then ``generate_batch`` may return
    # ``target_probs``/``position_mask`` instead of ``logits`` in draft mode) and
    # ``generate_prenorm`` (``--with-prenorm``: ``Eagle3TargetModel.generate_prenorm``) and
    # ``generate_hidden_packed`` (hidden mode's states of the real tokens only, rows back to
    # back: ``Eagle3TargetModel.generate_hidden_packed``).


@dataclass(frozen=True)
class FieldSpec:
    """A per-token tensor of a shard: ``[T]`` when ``width`` is None, else ``[T, width]``.

    ``dtype`` is a torch dtype name or ``"model"`` (the target's); ``width`` is None, or
    a multiple of a configuration key: ``("hidden_size", 3)`` is ``3 * hidden_size``."""

    name: str
    dtype: str
    width: tuple[str, int] | None = None

    def resolve(self, config: dict[str, Any]) -> tuple[str, int | None]:
        dt = config["dtype"] if self.dtype == "model" else self.dtype
        return dt, None if self.width is None else config[self.width[0]] * self.width[1]


# (source, input_ids, attention_mask, loss_mask [B,S] int64, lengths, mapping) -> fields [B,S,...]
Compute = Callable[..., "dict[str, torch.Tensor]"]
# The same arguments -> fields [T,...] of the real tokens, rows back to back; None when the
# source cannot give them packed (then the dump gathers them from ``compute``'s)
ComputePacked = Callable[..., "dict[str, torch.Tensor] | None"]

BASE_FIELDS = (FieldSpec("input_ids", "int64"), FieldSpec("loss_mask", "uint8"),
               FieldSpec("aux_hidden_states", "model", ("hidden_size", 3)))
"""Stored in every mode: ids and loss mask unshifted, as rendered; aux unshifted."""

PRENORM_FIELD = FieldSpec("final_prenorm", "model", ("hidden_size", 1))
"""Stored in any mode when asked (``dump --with-prenorm``; the configuration records
``"with_prenorm": true``, and only then, so a default dump's bytes do not change): the
last decoder layer's output *before* the final norm, **unshifted** like aux (row ``t`` is
the state at position ``t``). speculators' trainer takes this state and applies the
norm and LM head itself; the hidden mode's ``hidden_states`` are after the norm."""


@dataclass(frozen=True)
class ModeSpec:
    """A dump mode: its per-token fields (beyond :data:`BASE_FIELDS`) and how to compute
    them: ``compute`` for a right-padded batch, and ``compute_packed``, where a mode has
    one, for the real tokens only (what a shard stores, without a padded copy in between)."""

    name: str
    fields: tuple[FieldSpec, ...]
    needs_vocab: bool
    compute: Compute
    help: str
    compute_packed: ComputePacked | None = None

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def expected(self, config: dict[str, Any]) -> dict[str, tuple[str, int | None]]:
        """Every per-token tensor of a shard: name -> (dtype name, width or None)."""
        return {f.name: f.resolve(config) for f in stored_fields(self, config)}


def stored_fields(spec: ModeSpec, config: dict[str, Any]) -> tuple[FieldSpec, ...]:
    """The per-token fields a shard of this configuration holds, in file order: the base
    fields, the mode's, then :data:`PRENORM_FIELD` when the configuration asks for it."""
    extra = (PRENORM_FIELD,) if config.get("with_prenorm") else ()
    return BASE_FIELDS + spec.fields + extra


def compute_prenorm(source: TargetSource, ids, attn, lmask) -> "torch.Tensor":
    """``final_prenorm [B,S,H]`` (unshifted) of a batch, or ValueError naming the flag when
    the target cannot give it (a remote target, or an engine whose capture table says
    no): never another state under its name."""
    gen = getattr(source, "generate_prenorm", None)
    if gen is None:
        raise ValueError(f"--with-prenorm: {type(source).__name__} gives no state before the final norm "
                         f"(the server protocol does not carry it); run the dump in process with --model")
    try:
        _, pre = gen(ids, attn, lmask)
    except NotImplementedError as e:
        raise ValueError(f"--with-prenorm: {e}") from None
    return pre


def _compute_hidden(source: TargetSource, ids, attn, lmask, lengths, mapping) -> "dict[str, torch.Tensor]":
    from eagle3_target.contract import zero_tail

    aux, hidden = source.generate_hidden(ids, attn, lmask)
    return {"aux_hidden_states": aux, "hidden_states": zero_tail(hidden, lengths)}


def _compute_hidden_packed(source: TargetSource, ids, attn, lmask, lengths, mapping
                           ) -> "dict[str, torch.Tensor] | None":
    gen = getattr(source, "generate_hidden_packed", None)
    if gen is None:  # a remote target: the server sends padded rows
        return None
    aux, hidden = gen(ids, attn, lmask)
    return {"aux_hidden_states": aux, "hidden_states": hidden}


def _compute_logits(source: TargetSource, ids, attn, lmask, lengths, mapping) -> "dict[str, torch.Tensor]":
    from eagle3_target.contract import zero_tail

    batch = source.generate_batch(ids, attn, lmask)
    if batch.logits is None:
        raise RuntimeError("the target returned no logits (is a draft vocab mapping set on the server?)")
    return {"aux_hidden_states": batch.aux_hidden_states, "logits": zero_tail(batch.logits, lengths)}


def _compute_draft(source: TargetSource, ids, attn, lmask, lengths, mapping) -> "dict[str, torch.Tensor]":
    import torch

    from eagle3_target.contract import zero_tail
    from eagle3_target.vocab import compute_target_distribution

    batch = source.generate_batch(ids, attn, lmask)
    if batch.logits is not None:
        logits = zero_tail(batch.logits, lengths)
        probs, pmask = compute_target_distribution(
            logits, mapping.selected_token_ids, mapping.selected_token_mask, batch.loss_mask)
    else:  # the server projected onto the draft vocab already; fix its tails the same way
        probs, pmask = batch.target_probs.float(), batch.position_mask
        uniform = torch.softmax(torch.zeros(probs.shape[-1], device=probs.device), dim=-1)
        for r, n in enumerate(lengths):
            probs[r, n - 1:] = uniform
            pmask[r, n - 1:] = False
    return {"aux_hidden_states": batch.aux_hidden_states, "target_probs": probs,
            "position_mask": pmask.reshape(pmask.shape[0], pmask.shape[1]).bool()}


MODES: dict[str, ModeSpec] = {
    "hidden": ModeSpec("hidden", (FieldSpec("hidden_states", "model", ("hidden_size", 1)),), False,
                       _compute_hidden,
                       "aux + final-norm hidden state; the reader rebuilds logits with the LM head",
                       _compute_hidden_packed),
    "draft": ModeSpec("draft", (FieldSpec("target_probs", "float32", ("draft_vocab_size", 1)),
                                FieldSpec("position_mask", "bool")), True, _compute_draft,
                      "aux + target distribution over the draft vocabulary (fp32)"),
    "logits": ModeSpec("logits", (FieldSpec("logits", "model", ("vocab_size", 1)),), False,
                       _compute_logits, "aux + full all-position logits"),
}
