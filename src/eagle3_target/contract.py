"""The engine-agnostic EAGLE-3 supervision contract.

Owns what every engine and every transport shares:

- :class:`TargetRunner`, the narrow surface an inference engine implements (the same
  surface as NeMo Automodel's ``TargetRunner``, so our runners drop into NeMo's
  ``RunnerEagle3TargetModel``);
- the aux-layer convention: id ``k`` is the residual stream *output by* decoder layer
  ``k`` (0-based), i.e. transformers' ``hidden_states[k + 1]``, before the final norm;
- :class:`Eagle3TargetModel`, which turns a runner's unshifted ``(logits, aux)`` into an
  :class:`Eagle3TargetBatch` with the EAGLE-3 shift (logits, input_ids and loss_mask
  shifted left by one with a zero tail; aux and attention_mask unshifted);
- :class:`LMHead` (defined in :mod:`eagle3_target.lm_head`), the final projection
  (weight, logit scale, soft-cap) so a client holding the final-norm hidden state can
  rebuild the logits the target would give;
- input validation, done before any work so bad input changes nothing.

Nothing here imports an engine: engines register by name in :mod:`eagle3_target.engines`
and are imported lazily (:meth:`Eagle3TargetModel.from_pretrained`); the engines
package imports nothing from here at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from eagle3_target.engines.common import text_config
from eagle3_target.engines.packing import gather_rows
from eagle3_target.lm_head import LMHead

__all__ = [
    "TargetRunner",
    "HiddenRunner",
    "PackedHiddenRunner",
    "PrenormRunner",
    "LMHead",
    "Eagle3TargetBatch",
    "Eagle3TargetModel",
    "default_aux_layer_ids",
    "validate_aux_layer_ids",
    "validate_batch_inputs",
    "shift_left_with_zero",
    "shift_packed_with_zero",
    "zero_tail",
    "right_padded",
]


@runtime_checkable
class TargetRunner(Protocol):
    """What an engine must provide. Implemented by ``engines.hf`` and ``engines.sglang``.

    ``model`` exposes ``.config`` (``num_hidden_layers``, ``hidden_size``, ``vocab_size``)
    and ``.parameters()``.
    """

    model: Any

    def set_aux_layers(self, ids: Sequence[int]) -> None:
        """Capture exactly these three decoder layers (our id convention)."""

    def forward_eagle3(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One target forward.

        Args:
            input_ids: ``[B,S] int64``, right-padded.
            attention_mask: ``[B,S] int64`` (1 real token, 0 pad).

        Returns:
            ``(logits [B,S,V] model dtype, aux [B,S,3H] model dtype)``, both unshifted.
        """

    def input_embedding_weight(self) -> torch.Tensor:
        """``[V,H]`` input embedding weight."""

    def close(self) -> None:
        """Release the model and its memory. Idempotent."""


@runtime_checkable
class HiddenRunner(TargetRunner, Protocol):
    """A runner that can also skip the LM head (the compact ``hidden`` transport)."""

    def forward_eagle3_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(final_hidden [B,S,H], aux [B,S,3H])``, unshifted; final_hidden is
        after the final norm, the LM head's input."""

    def lm_head(self) -> "LMHead":
        """The LM head that turns ``final_hidden`` into the logits ``forward_eagle3`` gives."""


@runtime_checkable
class PackedHiddenRunner(HiddenRunner, Protocol):
    """A runner that can give the hidden mode's states for the real tokens only, as its
    forward makes them (SGLang's extend is ragged): no padded copy to build and gather
    back, and nothing that waits for the GPU."""

    def forward_eagle3_hidden_packed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(final_hidden [T,H], aux [T,3H])``, unshifted: the real tokens of
        :meth:`HiddenRunner.forward_eagle3_hidden`'s outputs, row after row."""


@runtime_checkable
class PrenormRunner(TargetRunner, Protocol):
    """A runner that can also give the final state *before* the final norm (what
    speculators' trainer wants: it applies the norm itself)."""

    def forward_eagle3_prenorm(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(final_prenorm [B,S,H], aux [B,S,3H])``, unshifted: the last decoder
        layer's output before the final norm."""


# --------------------------------------------------------------------------- aux ids


def default_aux_layer_ids(num_layers: int, *, name: str = "aux_layer_ids") -> list[int]:
    """EAGLE-3's low / middle / high recipe: ``[1, N//2-1, N-4]`` (32 layers -> [1,15,28]).

    Raises ValueError on a model too shallow for three distinct ids; we never
    deduplicate silently, since the draft's ``fc`` expects exactly ``3H`` inputs.
    ``name`` is what the message calls the ids' setting (``--aux-layers`` on the command
    line).
    """
    ids = [1, num_layers // 2 - 1, num_layers - 4]
    if len(set(ids)) != 3 or any(i < 0 or i >= num_layers for i in ids):
        raise ValueError(
            f"the model has {num_layers} decoder layers, too shallow for the default "
            f"EAGLE-3 aux layers {ids}: pass {name} explicitly "
            f"(three distinct ids in [0, {num_layers}))"
        )
    return ids


def validate_aux_layer_ids(ids: Sequence[int], num_layers: int, *, name: str = "aux_layer_ids") -> list[int]:
    """Checks three distinct, in-range integer ids; returns them as a list of int.
    ``name`` is what the messages call the setting."""
    ids = list(ids)
    if len(ids) != 3:
        raise ValueError(f"{name} must hold exactly 3 layer ids, got {len(ids)}: {ids}")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"{name} must be integers, got {i!r} in {ids}")
    if len(set(ids)) != 3:
        raise ValueError(f"{name} must be distinct, got {ids}")
    bad = [i for i in ids if i < 0 or i >= num_layers]
    if bad:
        raise ValueError(
            f"{name} {bad} out of range for a model with {num_layers} decoder layers "
            f"(valid ids are 0..{num_layers - 1})"
        )
    return [int(i) for i in ids]


# --------------------------------------------------------------------------- inputs


def _int_2d(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B,S], got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    return t


def validate_batch_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor | None,
    vocab_size: int,
) -> None:
    """Raises ValueError naming the field and the offending values; changes nothing.

    Args:
        input_ids: ``[B,S]`` integer, ids in ``[0, vocab_size)``.
        attention_mask: ``[B,S]`` integer or bool, 0/1.
        loss_mask: ``[B,S]`` integer or bool, 0/1 (or None where not needed).
    """
    fields = {"input_ids": input_ids, "attention_mask": attention_mask}
    if loss_mask is not None:
        fields["loss_mask"] = loss_mask
    for name, t in fields.items():
        _int_2d(name, t)
    shape = tuple(input_ids.shape)
    for name, t in fields.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has shape {shape}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"empty batch: input_ids has shape {shape}")
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bool(bad.any()):
        where = bad.nonzero()[:5].tolist()
        vals = input_ids[bad][:5].tolist()
        raise ValueError(
            f"input_ids out of range [0, {vocab_size}): values {vals} at [row, col] {where}"
        )
    for name in ("attention_mask", "loss_mask"):
        t = fields.get(name)
        if t is None:
            continue
        bad = (t != 0) & (t != 1)
        if bool(bad.any()):
            raise ValueError(
                f"{name} must hold only 0 and 1, got values {sorted(set(t[bad].tolist()))[:5]}"
            )
    if bool((attention_mask.sum(dim=1) == 0).any()):
        rows = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {rows[:5]} have no real token")


def right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is ones followed by zeros (``[B,S]``)."""
    m = attention_mask.to(torch.int64)
    lengths = m.sum(dim=1, keepdim=True)
    expected = (torch.arange(m.shape[1], device=m.device)[None, :] < lengths).to(torch.int64)
    return bool(torch.equal(m, expected))


# --------------------------------------------------------------------------- batch


def shift_left_with_zero(t: torch.Tensor, lengths: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """The EAGLE-3 next-token alignment of a ``[B,S,...]`` tensor: ``out[:, i] = t[:, i+1]``
    and ``out[:, -1] = 0``. With ``lengths`` (each right-padded row's real tokens), every
    row is zero from its own last real position on (:func:`zero_tail`): what a batch of
    that row alone gives. The one shift of the project: the contract, the server, the
    client and the dump all call it."""
    out = torch.cat((t[:, 1:], torch.zeros_like(t[:, :1])), dim=1)
    return out if lengths is None else zero_tail(out, lengths)


def shift_packed_with_zero(t: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """:func:`shift_left_with_zero` for rows packed back to back: ``t [T,...]`` holds row
    ``r``'s ``lengths[r]`` real tokens after row ``r-1``'s; ``out[i] = t[i+1]`` inside a row
    and each row's last token is zero. Equal to the real tokens of the padded shift with
    ``lengths``, and it never waits for the GPU (the row ends travel without a sync)."""
    out = torch.cat((t[1:], torch.zeros_like(t[:1])), dim=0)
    ends = torch.tensor(lengths, dtype=torch.int64).cumsum(0).sub_(1)
    return out.index_fill_(0, ends.to(out.device, non_blocking=True), 0)


def zero_tail(shifted: torch.Tensor, lengths: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """Zeroes, in place, each row of a shifted ``[B,S,...]`` tensor from position
    ``lengths[r] - 1`` on (the last real token has no next token to predict), or only the
    last column when ``lengths`` is None; returns the tensor. One masked fill, not a
    kernel per row (batches reach hundreds of rows)."""
    if lengths is None:
        shifted[:, -1] = 0
        return shifted
    pos = torch.arange(shifted.shape[1], device=shifted.device)
    last = torch.as_tensor(lengths, device=shifted.device).to(torch.int64).sub(1)
    tail = (pos[None, :] >= last[:, None]).reshape(*shifted.shape[:2], *([1] * (shifted.dim() - 2)))
    return shifted.masked_fill_(tail, 0)


@dataclass
class Eagle3TargetBatch:
    """Supervision for one batch, aligned as NeMo's ``Eagle3TargetBatch``.

    Fields:
        aux_hidden_states: ``[B,S,3H]`` model dtype, unshifted.
        input_ids: ``[B,S] int64``, shifted left by one, zero tail.
        attention_mask: ``[B,S]``, unshifted.
        loss_mask: ``[B,S]``, shifted left by one, zero tail.
        logits: ``[B,S,V]``, shifted left by one, zero tail (or None in draft form).
        target_probs: ``[B,S,Vd] fp32`` (draft form; already shifted).
        position_mask: ``[B,S,1] bool`` (draft form; already shifted).
    """

    aux_hidden_states: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    logits: torch.Tensor | None = None
    target_probs: torch.Tensor | None = None
    position_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        has_logits = self.logits is not None
        has_draft = self.target_probs is not None and self.position_mask is not None
        if has_logits == has_draft:
            raise ValueError(
                "Eagle3TargetBatch needs exactly one supervision form: logits, "
                "or target_probs together with position_mask"
            )


# --------------------------------------------------------------------------- model


class Eagle3TargetModel:
    """Supervision from any :class:`TargetRunner`, with the EAGLE-3 shift.

    ``Eagle3TargetModel(runner, aux_layer_ids=None)`` or
    ``Eagle3TargetModel.from_pretrained(path, engine="hf", ...)``.
    """

    def __init__(self, runner: TargetRunner, aux_layer_ids: Sequence[int] | None = None, *,
                 aux_ids_name: str = "aux_layer_ids"):
        self._runner = runner
        self.model = runner.model
        config = text_config(self.model.config)
        n = int(config.num_hidden_layers)
        ids = default_aux_layer_ids(n, name=aux_ids_name) if aux_layer_ids is None else aux_layer_ids
        self.aux_layer_ids: list[int] = validate_aux_layer_ids(ids, n, name=aux_ids_name)
        self.vocab_size: int = int(getattr(config, "vocab_size"))
        self.hidden_size: int = int(getattr(config, "hidden_size"))
        self.num_hidden_layers: int = n
        runner.set_aux_layers(self.aux_layer_ids)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        engine: str = "hf",
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        aux_layer_ids: Sequence[int] | None = None,
        aux_ids_name: str = "aux_layer_ids",
        **engine_kwargs: Any,
    ) -> "Eagle3TargetModel":
        """Loads ``path`` (a local model directory) with the named engine; ``aux_ids_name``
        is what errors about the ids call them (``--aux-layers`` on the command line)."""
        from eagle3_target.engines import build_runner

        runner = build_runner(engine, path, device=device, dtype=dtype, **engine_kwargs)
        try:
            return cls(runner, aux_layer_ids=aux_layer_ids, aux_ids_name=aux_ids_name)
        except BaseException:
            runner.close()
            raise

    @property
    def runner(self) -> TargetRunner:
        return self._runner

    def get_input_embeddings(self) -> SimpleNamespace:
        """An object with ``.weight [V,H]`` (what a draft's embedding copy reads)."""
        return SimpleNamespace(weight=self._runner.input_embedding_weight())

    def lm_head(self) -> LMHead:
        if not isinstance(self._runner, HiddenRunner):
            raise NotImplementedError(f"{type(self._runner).__name__} does not expose its LM head")
        return self._runner.lm_head()

    def validate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor | None,
    ) -> None:
        validate_batch_inputs(input_ids, attention_mask, loss_mask, self.vocab_size)

    @torch.no_grad()
    def generate_batch(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
    ) -> Eagle3TargetBatch:
        """Runs the target once and returns the shifted supervision.

        Args:
            input_ids: ``[B,S] int64``, right-padded.
            attention_mask: ``[B,S]`` 0/1.
            loss_mask: ``[B,S]`` 0/1.

        Returns:
            :class:`Eagle3TargetBatch` with ``logits [B,S,V]`` and ``aux [B,S,3H]``.
        """
        self.validate(input_ids, attention_mask, loss_mask)
        logits, aux = self._runner.forward_eagle3(input_ids, attention_mask)
        return Eagle3TargetBatch(
            aux_hidden_states=aux,
            logits=shift_left_with_zero(logits),
            input_ids=shift_left_with_zero(input_ids),
            attention_mask=attention_mask,
            loss_mask=shift_left_with_zero(loss_mask),
        )

    @torch.no_grad()
    def generate_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The compact form: ``(aux [B,S,3H], final_hidden [B,S,H])``, both shifted like
        the logits they stand for (aux unshifted, final_hidden shifted left with a zero tail),
        so ``lm_head()(final_hidden)`` equals ``generate_batch(...).logits`` on every
        position but the zero tail."""
        self.validate(input_ids, attention_mask, loss_mask)
        if not isinstance(self._runner, HiddenRunner):
            raise NotImplementedError(f"{type(self._runner).__name__} has no hidden mode")
        final_hidden, aux = self._runner.forward_eagle3_hidden(input_ids, attention_mask)
        return aux, shift_left_with_zero(final_hidden)

    @torch.no_grad()
    def generate_hidden_packed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`generate_hidden` for the real tokens only, rows back to back:
        ``(aux [T,3H], final_hidden [T,H])``, final_hidden shifted inside each row with a
        zero at its last token (:func:`shift_packed_with_zero`). What the dump stores.

        A :class:`PackedHiddenRunner` (SGLang) hands over its ragged outputs as they are;
        any other runner's padded outputs are gathered to the real tokens."""
        self.validate(input_ids, attention_mask, loss_mask)
        if not isinstance(self._runner, HiddenRunner):
            raise NotImplementedError(f"{type(self._runner).__name__} has no hidden mode")
        lengths = attention_mask.detach().to("cpu", torch.int64).sum(dim=1).tolist()
        if isinstance(self._runner, PackedHiddenRunner):
            final_hidden, aux = self._runner.forward_eagle3_hidden_packed(input_ids, attention_mask)
        else:
            padded = self._runner.forward_eagle3_hidden(input_ids, attention_mask)
            flat = gather_rows({"hidden": padded[0], "aux": padded[1]}, attention_mask)
            final_hidden, aux = flat["hidden"], flat["aux"]
        return aux, shift_packed_with_zero(final_hidden, lengths)

    @torch.no_grad()
    def generate_prenorm(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(aux [B,S,3H], final_prenorm [B,S,H])``, both **unshifted**: the last decoder
        layer's output before the final norm, position by position like aux (a trainer
        that applies the norm and LM head itself, as speculators' does, shifts it).
        Raises NotImplementedError where the engine cannot capture it (the SGLang
        capture table's pre-norm column) rather than return another state."""
        self.validate(input_ids, attention_mask, loss_mask)
        if not isinstance(self._runner, PrenormRunner):
            raise NotImplementedError(f"{type(self._runner).__name__} cannot capture the state before "
                                      f"the final norm")
        final_prenorm, aux = self._runner.forward_eagle3_prenorm(input_ids, attention_mask)
        return aux, final_prenorm

    def close(self) -> None:
        """Releases the runner. Idempotent."""
        self._runner.close()

    def __enter__(self) -> "Eagle3TargetModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
