"""Draft-vocabulary mapping and the projected target distribution."""

from __future__ import annotations

import pytest
import torch

from eagle3_target import VocabMapping, build_vocab_mapping, compute_target_distribution


def test_frequency_order_specials_first_and_ties_by_id():
    streams = [[5, 5, 5, 2, 2, 7], [7, 2, 9], [9, 3]]  # counts: 5:3, 2:3, 7:2, 9:2, 3:1
    m = build_vocab_mapping(streams, 5, special_ids=[0, 1], target_vocab_size=10)
    assert m.selected_token_ids.tolist() == [0, 1, 2, 5, 7]
    assert m.selected_token_mask.tolist() == [i in (0, 1, 2, 5, 7) for i in range(10)]


def test_counts_tensor_and_fill_with_unseen_ids():
    counts = torch.tensor([0, 0, 4, 0, 1, 0])
    m = build_vocab_mapping(counts, 4)
    assert m.selected_token_ids.tolist() == [2, 4, 0, 1]


def test_special_ids_are_deduplicated_and_kept_even_if_unseen():
    m = build_vocab_mapping(torch.tensor([0, 9, 0, 0]), 3, special_ids=[3, 3, 0])
    assert m.selected_token_ids.tolist() == [3, 0, 1]


def test_d2t_t2d_round_trip():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 50, (100,), generator=g)
    m = build_vocab_mapping(counts, 32, special_ids=[99, 0])
    draft = torch.arange(32)
    target = draft + m.d2t
    assert torch.equal(target, m.selected_token_ids)
    assert torch.equal(m.t2d, m.selected_token_mask)
    assert int(m.t2d.sum()) == 32 and bool(m.t2d[target].all())
    # and back: the draft id of each selected target id
    inv = torch.full((100,), -1)
    inv[m.selected_token_ids] = draft
    assert torch.equal(inv[target], draft)


def test_save_load_and_stable_id(tmp_path):
    m = build_vocab_mapping(torch.arange(20), 8, special_ids=[0])
    p = tmp_path / "m.safetensors"
    m.save(p)
    back = VocabMapping.load(p)
    assert torch.equal(back.selected_token_ids, m.selected_token_ids)
    assert torch.equal(back.selected_token_mask, m.selected_token_mask)
    assert back.mapping_id == m.mapping_id
    other = build_vocab_mapping(torch.arange(20), 8, special_ids=[1])
    assert other.mapping_id != m.mapping_id


@pytest.mark.parametrize("kwargs, msg", [
    (dict(draft_vocab_size=0), "draft_vocab_size must be an integer"),
    (dict(draft_vocab_size=11), "draft_vocab_size must be an integer"),
    (dict(draft_vocab_size=3, special_ids=[10]), "special id 10 out of range"),
    (dict(draft_vocab_size=1, special_ids=[1, 2]), "do not fit"),
])
def test_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        build_vocab_mapping(torch.ones(10, dtype=torch.int64), **kwargs)


def test_streams_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        build_vocab_mapping([[1, 12]], 2, target_vocab_size=10)


def test_inconsistent_mapping_rejected():
    with pytest.raises(ValueError, match="does not mark exactly"):
        VocabMapping(torch.tensor([1, 2]), torch.tensor([True, True, False]))
    with pytest.raises(ValueError, match="duplicate"):
        VocabMapping(torch.tensor([1, 1]), torch.tensor([False, True, False]))


def test_target_distribution_by_hand():
    logits = torch.tensor([[[1.0, 3.0, 0.0, 2.0],     # argmax 1: in draft vocab
                            [5.0, 0.0, 1.0, 0.0],     # argmax 0: not in draft vocab
                            [0.0, 1.0, 0.0, 4.0]]])   # argmax 3: in, but loss_mask 0
    ids = torch.tensor([3, 1])   # draft order: target 3, then target 1
    mask = torch.tensor([False, True, False, True])
    loss = torch.tensor([[1, 1, 0]])
    probs, pmask = compute_target_distribution(logits, ids, mask, loss)
    assert probs.dtype == torch.float32 and probs.shape == (1, 3, 2)
    e = torch.exp
    expected0 = torch.tensor([e(torch.tensor(2.0)), e(torch.tensor(3.0))])
    torch.testing.assert_close(probs[0, 0], expected0 / expected0.sum())
    torch.testing.assert_close(probs[0, 2], torch.softmax(torch.tensor([4.0, 1.0]), 0))
    assert pmask.shape == (1, 3, 1) and pmask.dtype == torch.bool
    assert pmask[0, :, 0].tolist() == [True, False, False]


def test_target_distribution_bf16_logits_give_fp32_probs():
    logits = torch.randn(2, 3, 10).to(torch.bfloat16)
    m = build_vocab_mapping(torch.arange(10), 4)
    probs, _ = compute_target_distribution(logits, m.selected_token_ids, m.selected_token_mask,
                                           torch.ones(2, 3))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))
