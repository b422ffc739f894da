"""The SGLang engine's behaviour on one release (0.5.16, the one validated on a GPU) and
the newest (0.5.23), against the fakes in tests/fake_sglang.py, on CPU: batching, pools,
modes, the wrapper, bad input, close and build arguments.

The fake runs transformers' Llama row by row with SGLang's capture convention, so every
comparison here is against the HF engine on the same weights: a packing, unpacking,
ordering or aux-index bug changes the numbers. Per-release construction is in
test_sglang_releases.py, per-family capture in test_sglang_capture.py, the official
switch in test_sglang_official.py. Nothing here imports sglang.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fake_sglang
from eagle3_target import Eagle3TargetModel
from eagle3_target.contract import zero_tail
from eagle3_target.engines import sglang as sg
from sglang_helpers import TOL, use_fake, ragged as _ragged, hf_rows

RELEASES = ("0.5.16", "0.5.23")


@pytest.fixture(params=RELEASES)
def fake_api(request, monkeypatch):
    """The fake release's process context (published config, teardown log, runners)."""
    return use_fake(monkeypatch, request.param)


@pytest.fixture
def runner(fake_api, tiny_path):
    r = sg.build(tiny_path, dtype="float32")
    yield r
    r.close()


def _hf_rows(hf_runner, ids, mask, aux_ids):
    return [(lg, ax, fh) for lg, ax, fh, _ in hf_rows(hf_runner, ids, mask, aux_ids)]


# --------------------------------------------------------------------------- pure pieces


def test_sglang_dtype_str_maps_exactly_three_dtypes():
    assert sg.sglang_dtype_str(None) == "auto"
    assert sg.sglang_dtype_str(torch.float32) == "float32"
    assert sg.sglang_dtype_str(torch.float16) == "float16"
    assert sg.sglang_dtype_str(torch.bfloat16) == "bfloat16"
    for bad in (torch.int64, torch.float64, "bfloat16", 3):
        with pytest.raises(ValueError, match="unsupported SGLang dtype"):
            sg.sglang_dtype_str(bad)


def test_plan_extends_splits_in_order_within_budgets():
    assert sg.plan_extends([5, 5, 5], max_tokens=100, max_rows=8) == [[0, 1, 2]]
    assert sg.plan_extends([5, 5, 5], max_tokens=10, max_rows=8) == [[0, 1], [2]]
    assert sg.plan_extends([5, 5, 5], max_tokens=100, max_rows=2) == [[0, 1], [2]]
    # page rounding: 5 tokens take 8 slots with page 4
    assert sg.plan_extends([5, 5], max_tokens=15, max_rows=8, page_size=4) == [[0], [1]]
    with pytest.raises(ValueError, match="row 1 has 11 real tokens"):
        sg.plan_extends([3, 11], max_tokens=10, max_rows=8)


def test_row_spans_and_scatter_round_trip():
    ids, mask = _ragged([3, 6, 1], S=6, left=False)
    starts, lengths = sg.row_spans(ids, mask)
    assert starts == [0, 0, 0] and lengths == [3, 6, 1]
    ids_l, mask_l = _ragged([3, 6, 1], S=6, left=True)
    assert sg.row_spans(ids_l, mask_l) == ([3, 0, 5], [3, 6, 1])
    packed = torch.arange(10, dtype=torch.float32)[:, None]
    out = sg.scatter_rows(packed, mask_l)
    assert out.shape == (3, 6, 1)
    assert out[0, :, 0].tolist() == [0, 0, 0, 0, 1, 2]
    assert out[1, :, 0].tolist() == [3, 4, 5, 6, 7, 8]
    assert out[2, :, 0].tolist() == [0, 0, 0, 0, 0, 9]
    full = torch.ones(2, 3, dtype=torch.int64)
    view = sg.scatter_rows(packed[:6], full)
    assert view.data_ptr() == packed.data_ptr()  # no pad: no copy


@pytest.mark.parametrize("mask, msg", [
    ([[1, 0, 1]], "not one contiguous run"),
    ([[0, 0, 0]], "no real token"),
    ([[1, 2, 0]], "only 0 and 1"),
])
def test_row_spans_rejects_bad_masks(mask, msg):
    with pytest.raises(ValueError, match=msg):
        sg.row_spans(torch.zeros(1, 3, dtype=torch.int64), torch.tensor(mask))


# --------------------------------------------------------------------------- vs the HF engine


@pytest.mark.parametrize("left", [False, True])
def test_ragged_batch_matches_hf_per_row_in_one_extend(runner, hf_runner, left):
    aux_ids = [5, 0, 3]  # unsorted on purpose: SGLang returns captures in layer order
    runner.set_aux_layers(aux_ids)
    lengths = [9, 17, 4, 12]
    ids, mask = _ragged(lengths, S=17, left=left)
    before = runner.extends
    logits, aux = runner.forward_eagle3(ids, mask)
    assert runner.extends == before + 1  # one ragged extend for the whole batch
    assert logits.shape == (4, 17, runner.vocab_size) and aux.shape == (4, 17, 3 * 128)
    ref = _hf_rows(hf_runner, ids, mask, aux_ids)
    for b in range(4):
        real = mask[b].bool()
        torch.testing.assert_close(logits[b][real], ref[b][0], **TOL)
        torch.testing.assert_close(aux[b][real], ref[b][1], **TOL)
        assert not logits[b][~real].any() and not aux[b][~real].any()  # zeros at pads


def test_only_real_tokens_are_sent(runner, monkeypatch):
    runner.set_aux_layers([1, 3, 4])
    seen = []
    mr = runner._mr
    orig = mr.forward
    monkeypatch.setattr(mr, "forward", lambda fb: seen.append(fb.input_ids.clone()) or orig(fb))
    ids, mask = _ragged([3, 5], S=8)
    runner.forward_eagle3(ids, mask)
    assert len(seen) == 1
    assert seen[0].tolist() == ids[0, :3].tolist() + ids[1, :5].tolist()


def test_batch_mates_do_not_change_a_row(runner):
    runner.set_aux_layers([1, 3, 4])
    ids, mask = _ragged([10, 6, 13], S=13, seed=3)
    logits, aux = runner.forward_eagle3(ids, mask)
    for b in range(3):
        lb, ab = runner.forward_eagle3(ids[b:b + 1], mask[b:b + 1])
        torch.testing.assert_close(logits[b], lb[0], **TOL)
        torch.testing.assert_close(aux[b], ab[0], **TOL)


def test_hidden_mode_and_lm_head_rebuild_the_logits(runner, hf_runner):
    runner.set_aux_layers([2, 6, 1])
    ids, mask = _ragged([7, 11], S=11, seed=5)
    final, aux_h = runner.forward_eagle3_hidden(ids, mask)
    logits, aux = runner.forward_eagle3(ids, mask)
    assert final.shape == (2, 11, 128)
    torch.testing.assert_close(aux_h, aux)
    head = runner.lm_head()
    assert head.weight.shape == (runner.vocab_size, 128)
    real = mask.bool()
    torch.testing.assert_close(head(final)[real], logits[real], **TOL)
    assert not final[~real].any()
    ref = _hf_rows(hf_runner, ids, mask, [2, 6, 1])
    for b in range(2):
        torch.testing.assert_close(final[b][mask[b].bool()], ref[b][2], **TOL)


@pytest.mark.parametrize("left", [False, True])
def test_packed_hidden_mode_is_the_padded_one_without_the_pads(runner, hf_runner, left):
    runner.set_aux_layers([2, 6, 1])
    lengths = [7, 11, 3, 9]
    ids, mask = _ragged(lengths, S=11, seed=5, left=left)
    before = runner.extends
    final_p, aux_p = runner.forward_eagle3_hidden_packed(ids, mask)
    assert runner.extends == before + 1
    assert final_p.shape == (sum(lengths), 128) and aux_p.shape == (sum(lengths), 3 * 128)
    final, aux = runner.forward_eagle3_hidden(ids, mask)
    real = mask.bool()
    assert torch.equal(final_p, final[real]) and torch.equal(aux_p, aux[real])  # row after row
    ref = _hf_rows(hf_runner, ids, mask, [2, 6, 1])
    start = 0
    for b, n in enumerate(lengths):
        torch.testing.assert_close(final_p[start:start + n], ref[b][2], **TOL)
        torch.testing.assert_close(aux_p[start:start + n], ref[b][1], **TOL)
        start += n


def test_packed_hidden_mode_never_builds_the_padded_tensors(runner, monkeypatch):
    runner.set_aux_layers([1, 3, 4])
    called = []
    monkeypatch.setattr(sg, "scatter_rows", lambda *a: called.append(1))
    runner.forward_eagle3_hidden_packed(*_ragged([3, 5], S=8))
    assert not called


def test_contract_layer_on_top_matches_hf_engine(fake_api, tiny_path, hf_runner):
    ids, mask = _ragged([6, 10, 3], S=10, seed=11)
    loss = mask.clone()
    with Eagle3TargetModel.from_pretrained(tiny_path, engine="sglang", dtype="float32") as t:
        got = t.generate_batch(ids, mask, loss)
        aux_c, final_c = t.generate_hidden(ids, mask, loss)
        t_packed = t.generate_hidden_packed(ids, mask, loss)
        emb = t.get_input_embeddings().weight
    ref = Eagle3TargetModel(hf_runner).generate_batch(ids, mask, loss)
    real = mask.bool()
    torch.testing.assert_close(got.aux_hidden_states[real], ref.aux_hidden_states[real], **TOL)
    shifted_real = torch.cat([real[:, 1:], torch.zeros_like(real[:, :1])], 1)
    torch.testing.assert_close(got.logits[shifted_real], ref.logits[shifted_real], **TOL)
    assert torch.equal(got.input_ids, ref.input_ids) and torch.equal(got.loss_mask, ref.loss_mask)
    torch.testing.assert_close(aux_c, got.aux_hidden_states)
    assert final_c.shape == (3, 10, 128)
    # The packed pair is the padded pair's real tokens, with each row's last one zeroed
    # (the padded shift puts a pad's state there, which the dump zeroes too).
    aux_p, final_p = t_packed
    lengths = mask.sum(1).tolist()
    assert torch.equal(aux_p, aux_c[real])
    assert torch.equal(final_p, zero_tail(final_c.clone(), lengths)[real])
    assert final_p[torch.tensor(lengths).cumsum(0) - 1].abs().sum() == 0
    torch.testing.assert_close(emb, hf_runner.input_embedding_weight())


def test_small_pool_runs_several_extends_with_the_same_result(fake_api, tiny_path):
    ids, mask = _ragged([9, 17, 4, 12], S=17, seed=2)
    big = sg.build(tiny_path, dtype="float32", page_size=1)
    small = sg.build(tiny_path, dtype="float32", max_batch_tokens=20, max_batch_rows=2, page_size=1)
    try:
        for r in (big, small):
            r.set_aux_layers([1, 3, 4])
        lb, ab = big.forward_eagle3(ids, mask)
        ls, as_ = small.forward_eagle3(ids, mask)
        assert big.extends == 1 and small.extends == 3  # [9], [17], [4, 12]
        torch.testing.assert_close(ls, lb, **TOL)
        torch.testing.assert_close(as_, ab, **TOL)
        with pytest.raises(ValueError, match="max_batch_tokens"):
            small.forward_eagle3(*_ragged([30], S=30))
    finally:
        big.close()
        small.close()


# --------------------------------------------------------------------------- aux ids


def test_aux_ids_mean_layer_outputs_like_hf(runner, hf_runner):
    """Each id alone: SGLang's capture of id k equals HF's output of layer k."""
    ids, mask = _ragged([8], S=8, seed=4)
    for trio in ([0, 1, 2], [4, 5, 6], [6, 2, 0]):
        runner.set_aux_layers(trio)
        _, aux = runner.forward_eagle3(ids, mask)
        hf_runner.set_aux_layers(trio)
        _, ref = hf_runner.forward_eagle3(ids, mask)
        torch.testing.assert_close(aux, ref, **TOL)


def test_last_layer_and_bad_ids_are_rejected(runner):
    with pytest.raises(ValueError, match="last decoder layer"):
        runner.set_aux_layers([1, 3, 7])
    with pytest.raises(ValueError, match="out of range"):
        runner.set_aux_layers([1, 3, 8])
    with pytest.raises(ValueError, match="distinct"):
        runner.set_aux_layers([1, 1, 3])


def test_a_model_breaking_the_capture_convention_is_caught(runner):
    runner.model.indices_for = lambda ids: list(ids)  # a port that forgot the +1
    with pytest.raises(RuntimeError, match="expected \\[2, 4, 5\\]"):
        runner.set_aux_layers([1, 3, 4])


def test_forward_before_set_aux_layers_raises(runner):
    with pytest.raises(RuntimeError, match="set_aux_layers"):
        runner.forward_eagle3(*_ragged([3], S=3))


# --------------------------------------------------------------------------- wrapper


def test_full_logits_keeps_scale_gather_vocab_cut_and_softcap():
    class Cfg:
        vocab_size = 6
        final_logit_softcapping = 2.0

    pkg = fake_sglang.install("0.5.16")
    mod = __import__(pkg + ".srt.layers.logits_processor", fromlist=["x"])
    lp = mod.LogitsProcessor(Cfg(), logit_scale=0.5)
    lp.do_tensor_parallel_all_gather = True
    # a vocab shard of 4 rows; the "gather" appends a second shard of 4 (8 = padded vocab)
    lp._logits_gatherer = lambda x: torch.cat([x, 10 * x], dim=-1)
    head = torch.nn.Linear(3, 4, bias=False)
    h = torch.randn(5, 3)
    md = mod.LogitsMetadata(forward_mode=fake_sglang.ForwardMode.EXTEND)
    got = sg.full_logits(lp, h, head, md, None)
    x = 0.5 * h @ head.weight.T
    want = torch.cat([x, 10 * x], -1)[:, :6]
    want = torch.tanh(want / 2.0) * 2.0
    torch.testing.assert_close(got, want)
    assert lp.calls == ["gather_dp", "lm_head", "scatter_dp"]


def test_wrapped_processor_is_stock_when_disarmed(runner):
    runner.set_aux_layers([1, 3, 4])
    w = runner._wrappers[0]
    assert isinstance(runner.model.logits_processor, sg.Eagle3LogitsProcessor)
    assert w.mode is None
    out = runner.forward_packed(*_ragged([4, 6], S=6), mode="stock")
    assert out == {} and w.mode is None and w.result is None
    assert runner.model.capture_aux_hidden_states is True  # restored after the stock run
    assert runner.model.model.layers_to_capture == [2, 4, 5]
    logits, _ = runner.forward_eagle3(*_ragged([4, 6], S=6))  # capture works again
    assert logits.shape == (2, 6, runner.vocab_size)


# --------------------------------------------------------------------------- state


def _pools_full(runner):
    mr = runner._mr
    return (mr.token_to_kv_pool_allocator.available_size() == mr.token_to_kv_pool_allocator.size
            and len(mr.req_to_token_pool.free_slots) == mr.req_to_token_pool.size)


def test_pools_are_cleared_after_every_call_even_on_failure(runner):
    runner.set_aux_layers([1, 3, 4])
    ids, mask = _ragged([16, 16], S=16)
    for _ in range(3):
        runner.forward_eagle3(ids, mask)
        assert _pools_full(runner)
    runner.model.fail_next_forward = True
    with pytest.raises(RuntimeError, match="injected failure"):
        runner.forward_eagle3(ids, mask)
    assert _pools_full(runner)
    assert all(w.mode is None and w.result is None for w in runner._wrappers)
    logits, _ = runner.forward_eagle3(ids, mask)  # still usable
    assert logits.shape[:2] == (2, 16)


def test_pool_reuse_needs_clearing(fake_api, tiny_path):
    """A pool just big enough for one batch serves many batches: only if cleared."""
    r = sg.build(tiny_path, dtype="float32", max_batch_tokens=32, max_batch_rows=2, page_size=1)
    try:
        r.set_aux_layers([1, 3, 4])
        ids, mask = _ragged([16, 16], S=16)
        for _ in range(4):
            r.forward_eagle3(ids, mask)
        assert r.extends == 4
    finally:
        r.close()


@pytest.mark.parametrize("bad, msg", [
    (lambda i, m: (i, m[:, :-1]), "shape"),
    (lambda i, m: (i.float(), m), "integer"),
    (lambda i, m: (i.clone().fill_(5000), m), "out of range"),
    (lambda i, m: (i, m.clone().index_fill_(1, torch.tensor([1]), 0)), "contiguous"),
])
def test_bad_input_raises_and_runs_nothing(runner, bad, msg):
    runner.set_aux_layers([1, 3, 4])
    ids, mask = _ragged([5, 5], S=5)
    with pytest.raises(ValueError, match=msg):
        runner.forward_eagle3(*bad(ids, mask))
    assert runner.extends == 0 and _pools_full(runner)


def test_close_is_idempotent_and_final(fake_api, tiny_path):
    r = sg.build(tiny_path, dtype="float32")
    r.set_aux_layers([1, 3, 4])
    r.close()
    r.close()
    assert fake_api.torn_down == ["model_parallel", "distributed_environment"]
    for call in (lambda: r.forward_eagle3(*_ragged([3], S=3)), r.lm_head, r.input_embedding_weight,
                 lambda: r.set_aux_layers([1, 3, 4])):
        with pytest.raises(RuntimeError, match="closed"):
            call()


# --------------------------------------------------------------------------- build


def test_build_configures_server_args_and_a_world_of_one(fake_api, tiny_path):
    r = sg.build(tiny_path, dtype=torch.bfloat16, gpu_id=0, max_batch_tokens=4096, max_batch_rows=8,
                 attention_backend="triton", page_size=4)
    try:
        mr = r._mr
        sa = mr.server_args
        assert (sa.dtype, sa.tp_size, sa.attention_backend, sa.page_size) == ("bfloat16", 1, "triton", 4)
        assert r._page == 4
        assert sa.skip_tokenizer_init and sa.enable_return_hidden_states
        assert sa.disable_cuda_graph and sa.disable_radix_cache
        assert sa.max_total_tokens == 4096 + 8 * 4 + 4 and sa.max_running_requests == 8
        assert 0 < mr.nccl_port < 65536
        assert mr.steps == ["alloc_memory_pool", "init_attention_backends", "init_cuda_graphs"]
        assert r.max_batch_tokens == 4096 and r.max_batch_rows == 8
    finally:
        r.close()


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(tp_size=2), ValueError, "tp_size 2 needs GPUs 0..1 but only 1 CUDA device"),
    (dict(tp_size=0), ValueError, "tp_size must be a positive int"),
    (dict(device="cpu"), ValueError, "CUDA only"),
    (dict(dtype=torch.int32), ValueError, "unsupported dtype"),
    (dict(max_batch_tokens=0), ValueError, "max_batch_tokens"),
    (dict(disable_cuda_graph=False), ValueError, "set by the SGLang engine"),
    (dict(not_a_field=1), ValueError, "unknown SGLang ServerArgs"),
    (dict(gpu_id=3), ValueError, "only 1 CUDA device"),
])
def test_build_rejects_bad_arguments(fake_api, tiny_path, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        sg.build(tiny_path, **kwargs)
    assert fake_api.runners == []  # nothing was loaded


def test_build_rejects_a_missing_directory(fake_api, tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        sg.build(str(tmp_path / "nope"))


def test_clear_errors_without_cuda_or_sglang(monkeypatch, tiny_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(sg.SGLangUnavailableError, match="needs a CUDA GPU"):
        Eagle3TargetModel.from_pretrained(tiny_path, engine="sglang")
    monkeypatch.setattr(sg, "_cuda_device_count", lambda: 1)
    monkeypatch.setattr(sg, "_set_device", lambda i: None)
    monkeypatch.setattr(sg.importlib.util, "find_spec", lambda name: None)  # as if not installed
    with pytest.raises(sg.SGLangUnavailableError, match="needs the sglang package"):
        sg.build(tiny_path)


def test_importing_the_package_and_engine_never_imports_sglang():
    code = ("import sys, eagle3_target, eagle3_target.engines, eagle3_target.engines.sglang, "
            "eagle3_target.cli; assert 'sglang' not in sys.modules, 'sglang imported'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
