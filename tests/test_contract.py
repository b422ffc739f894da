"""Eagle3TargetModel against a fake runner: the shift, the zero tail, unshifted aux, and
an error naming the field for every invalid input, raised before the runner is called."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from eagle3_target import Eagle3TargetModel, default_aux_layer_ids, validate_aux_layer_ids
from eagle3_target.contract import LMHead, TargetRunner, shift_left_with_zero, shift_packed_with_zero

V, H, N = 11, 4, 8


class FakeRunner:
    """Logits encode (row, position, vocab) and aux encodes (row, position, channel), so any
    misplaced element is visible."""

    def __init__(self, layers: int = N):
        self.model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=layers, hidden_size=H,
                                                            vocab_size=V))
        self.aux_ids = None
        self.calls = 0
        self.closed = 0

    def set_aux_layers(self, ids):
        self.aux_ids = list(ids)

    def forward_eagle3(self, input_ids, attention_mask):
        self.calls += 1
        b, s = input_ids.shape
        logits = (torch.arange(b)[:, None, None] * 10000 + torch.arange(s)[None, :, None] * 100
                  + torch.arange(V)[None, None, :]).float()
        aux = (torch.arange(b)[:, None, None] * 10000 + torch.arange(s)[None, :, None] * 100
               + torch.arange(3 * H)[None, None, :]).float()
        return logits, aux

    def input_embedding_weight(self):
        return torch.ones(V, H)

    def close(self):
        self.closed += 1


def make(**kw):
    r = FakeRunner()
    return r, Eagle3TargetModel(r, **kw)


def inputs(b=2, s=5):
    ids = torch.arange(b * s).reshape(b, s) % V
    return ids, torch.ones(b, s, dtype=torch.int64), torch.ones(b, s, dtype=torch.int64)


def test_fake_runner_satisfies_protocol():
    assert isinstance(FakeRunner(), TargetRunner)


def test_shift_and_zero_tail():
    r, t = make()
    ids, am, lm = inputs()
    lm[0, 2] = 0
    out = t.generate_batch(ids, am, lm)
    raw_logits, raw_aux = r.forward_eagle3(ids, am)
    assert torch.equal(out.logits[:, :-1], raw_logits[:, 1:])
    assert torch.equal(out.logits[:, -1], torch.zeros_like(out.logits[:, -1]))
    assert torch.equal(out.input_ids[:, :-1], ids[:, 1:]) and bool((out.input_ids[:, -1] == 0).all())
    assert torch.equal(out.loss_mask[:, :-1], lm[:, 1:]) and out.loss_mask[0, 1] == 0
    assert bool((out.loss_mask[:, -1] == 0).all())
    assert torch.equal(out.aux_hidden_states, raw_aux)  # not shifted
    assert out.attention_mask is am  # not shifted
    assert out.logits.shape == (2, 5, V) and out.aux_hidden_states.shape == (2, 5, 3 * H)


def test_shift_helper():
    t = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert shift_left_with_zero(t).tolist() == [[2, 3, 0], [5, 6, 0]]


def test_packed_shift_is_the_padded_shift_of_each_row():
    lengths = [3, 1, 4]
    padded = torch.arange(1, 1 + 3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2)
    real = torch.arange(4)[None, :] < torch.tensor(lengths)[:, None]
    packed = shift_packed_with_zero(padded[real], lengths)
    assert torch.equal(packed, shift_left_with_zero(padded, lengths)[real])
    assert packed[:, 0].tolist() == [3, 5, 0, 0, 19, 21, 23, 0]  # row ends never see the next row


def test_packed_hidden_mode_of_a_padded_runner_is_its_real_tokens(tiny_target):
    """A runner without a packed path (transformers) is gathered: the same values as the
    padded pair with each row's tail zeroed, on right- and left-padded rows."""
    from eagle3_target.contract import zero_tail

    g = torch.Generator().manual_seed(4)
    lengths = [5, 2, 7]
    for left in (False, True):
        pos = torch.arange(7)[None, :]
        n = torch.tensor(lengths)[:, None]
        am = ((pos >= 7 - n) if left else (pos < n)).to(torch.int64)
        ids = torch.randint(3, tiny_target.vocab_size, (3, 7), generator=g) * am
        aux_p, hid_p = tiny_target.generate_hidden_packed(ids, am, am)
        aux, hid = tiny_target.generate_hidden(ids, am, am)
        real = am.bool()
        assert torch.equal(aux_p, aux[real])
        if left:  # the padded pair shifts across the left pads; per row it is the row alone
            for r, k in enumerate(lengths):
                row = ids[r:r + 1, 7 - k:]
                _, alone = tiny_target.generate_hidden(row, torch.ones_like(row), torch.ones_like(row))
                start = sum(lengths[:r])
                torch.testing.assert_close(hid_p[start:start + k], alone[0], atol=1e-5, rtol=1e-4)
        else:
            assert torch.equal(hid_p, zero_tail(hid.clone(), lengths)[real])


def test_aux_ids_default_and_passed_to_runner():
    r, t = make()
    assert t.aux_layer_ids == [1, 3, 4] == r.aux_ids
    r2 = FakeRunner()
    t2 = Eagle3TargetModel(r2, aux_layer_ids=[0, 2, 7])
    assert r2.aux_ids == [0, 2, 7] == t2.aux_layer_ids
    assert default_aux_layer_ids(32) == [1, 15, 28]


@pytest.mark.parametrize("ids, msg", [
    ([1, 2], "exactly 3"),
    ([1, 2, 3, 4], "exactly 3"),
    ([1, 1, 2], "distinct"),
    ([1, 2, 8], "out of range"),
    ([-1, 2, 3], "out of range"),
    ([1, 2.0, 3], "integers"),
])
def test_bad_aux_ids(ids, msg):
    with pytest.raises(ValueError, match=msg):
        Eagle3TargetModel(FakeRunner(), aux_layer_ids=ids)
    with pytest.raises(ValueError, match=msg):
        validate_aux_layer_ids(ids, N)


def test_too_shallow_for_default_asks_for_explicit_ids():
    with pytest.raises(ValueError, match="pass aux_layer_ids explicitly"):
        Eagle3TargetModel(FakeRunner(layers=4))
    # Explicit ids work on the same model: never a silent dedup.
    assert Eagle3TargetModel(FakeRunner(layers=4), aux_layer_ids=[0, 1, 3]).aux_layer_ids == [0, 1, 3]


def _bad(field, value):
    ids, am, lm = inputs()
    d = {"input_ids": ids, "attention_mask": am, "loss_mask": lm}
    d[field] = value(d[field])
    return d


@pytest.mark.parametrize("field, mutate, msg", [
    ("input_ids", lambda t: t.float(), "input_ids must be an integer tensor"),
    ("input_ids", lambda t: t[0], r"input_ids must be 2-D"),
    ("input_ids", lambda t: t.tolist(), "input_ids must be a torch.Tensor"),
    ("input_ids", lambda t: t.clone().index_fill_(1, torch.tensor([1]), V), r"input_ids out of range \[0, 11\): values \[11, 11\]"),
    ("input_ids", lambda t: t.clone().index_fill_(1, torch.tensor([0]), -3), "input_ids out of range"),
    ("attention_mask", lambda t: t[:, :4], r"attention_mask has shape \(2, 4\)"),
    ("attention_mask", lambda t: t * 2, r"attention_mask must hold only 0 and 1, got values \[2\]"),
    ("attention_mask", lambda t: torch.zeros_like(t), "have no real token"),
    ("loss_mask", lambda t: t - 2, "loss_mask must hold only 0 and 1"),
    ("loss_mask", lambda t: t.to(torch.float32), "loss_mask must be an integer tensor"),
    ("loss_mask", lambda t: t[None], "loss_mask must be 2-D"),
])
def test_invalid_inputs_name_the_field_and_run_nothing(field, mutate, msg):
    r, t = make()
    with pytest.raises(ValueError, match=msg):
        t.generate_batch(**_bad(field, mutate))
    assert r.calls == 0


def test_empty_batch():
    r, t = make()
    e = torch.zeros(0, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="empty batch"):
        t.generate_batch(e, e, e)
    assert r.calls == 0


def test_bool_masks_accepted():
    r, t = make()
    ids, am, lm = inputs()
    out = t.generate_batch(ids, am.bool(), lm.bool())
    assert out.loss_mask.dtype == torch.bool and r.calls == 1


def test_embeddings_and_close():
    r, t = make()
    assert t.get_input_embeddings().weight.shape == (V, H)
    t.close()
    assert r.closed == 1


def test_hidden_mode_needs_a_hidden_runner():
    r, t = make()
    with pytest.raises(NotImplementedError, match="FakeRunner"):
        t.generate_hidden(*inputs())
    with pytest.raises(NotImplementedError, match="FakeRunner"):
        t.generate_hidden_packed(*inputs())


def test_lm_head_scale_and_softcap():
    w = torch.randn(7, 3)
    h = torch.randn(2, 3)
    plain = h @ w.T
    assert torch.allclose(LMHead(w)(h), plain)
    assert torch.allclose(LMHead(w, scale=0.5)(h), plain * 0.5)
    capped = LMHead(w, softcap=2.0)(h)
    assert torch.allclose(capped, 2.0 * torch.tanh(plain / 2.0))
    assert float(capped.abs().max()) < 2.0
