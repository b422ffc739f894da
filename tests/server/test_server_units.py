"""Server pieces without HTTP: parameter and input validation, the token check, the
bind rule, and the engine worker's packing (real tiny model, real forward)."""

from __future__ import annotations

import base64
import hashlib
import threading

import pytest
import torch

from eagle3_target.server.auth import token_matches
from eagle3_target.server.run import check_bind, is_loopback, read_token
from eagle3_target.server.worker import EngineWorker, Job
from eagle3_target.server.outputs import postprocess
from eagle3_target.wire.v1 import MODES, NEMO_GENERATE, ApiError, check_inputs, parse_supervision_params
from eagle3_target.vocab import VocabMapping, compute_target_distribution
from server_helpers import make_inputs

# ----------------------------------------------------------------------------- params


@pytest.mark.parametrize("query, field", [
    ({"mode": "full"}, "mode"),
    ({"mode": "draft"}, "mapping_id"),
    ({"mode": "draft", "mapping_id": "../etc"}, "mapping_id"),
    ({"mode": "logits", "mapping_id": "abc"}, "mapping_id"),
    ({"mode": "topk"}, "k"),
    ({"mode": "topk", "k": "0"}, "k"),
    ({"mode": "topk", "k": "65"}, "k"),
    ({"mode": "topk", "k": "x"}, "k"),
    ({"mode": "hidden", "k": "3"}, "k"),
    ({"dtype": "int8"}, "dtype"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_parameters_are_422_naming_the_field(query, field):
    with pytest.raises(ApiError) as e:
        parse_supervision_params(query)
    assert e.value.status == 422 and e.value.field == field and field in e.value.detail


def test_good_parameters_round_trip():
    p = parse_supervision_params({"mode": "topk", "k": "8", "dtype": "bfloat16"})
    assert (p.mode, p.k, p.dtype) == ("topk", 8, "bfloat16")
    assert parse_supervision_params(p.to_query()) == p
    assert parse_supervision_params({}).mode == "logits"


def _ok():
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.clone()}


@pytest.mark.parametrize("change, status, field", [
    (lambda t: t.pop("input_ids"), 422, "input_ids"),
    (lambda t: t.pop("attention_mask"), 422, "attention_mask"),
    (lambda t: t.update(extra=torch.zeros(1)), 422, "extra"),
    (lambda t: t.update(input_ids=t["input_ids"].float()), 422, "input_ids"),
    (lambda t: t.update(attention_mask=torch.full((2, 3), float("nan"))), 422, "attention_mask"),
    (lambda t: t.update(attention_mask=t["attention_mask"][:, :2]), 422, "attention_mask"),
    (lambda t: t.update(input_ids=t["input_ids"][0]), 422, "input_ids"),
    (lambda t: t.update(input_ids=t["input_ids"] + 5000), 422, "input_ids"),
    (lambda t: t.update(input_ids=t["input_ids"] - 9), 422, "input_ids"),
    (lambda t: t.update(loss_mask=t["loss_mask"] * 2), 422, "loss_mask"),
    (lambda t: t.update(attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]])), 422, "attention_mask"),
    (lambda t: t.update(input_ids=torch.zeros((0, 3), dtype=torch.int64),
                        attention_mask=torch.zeros((0, 3), dtype=torch.int64),
                        loss_mask=torch.zeros((0, 3), dtype=torch.int64)), 422, "input_ids"),
    (lambda t: t.update(input_ids=torch.zeros((100, 100), dtype=torch.int64),
                        attention_mask=torch.ones((100, 100), dtype=torch.int64),
                        loss_mask=torch.ones((100, 100), dtype=torch.int64)), 413, "input_ids"),
])
def test_bad_inputs_are_rejected_naming_the_field(change, status, field):
    t = _ok()
    change(t)
    with pytest.raises(ApiError) as e:
        check_inputs(t, vocab_size=2048, need_loss_mask=True, max_tokens=4096)
    assert (e.value.status, e.value.field) == (status, field)
    assert field in e.value.detail


def test_good_inputs_come_back_as_int64():
    t = _ok()
    t["attention_mask"] = t["attention_mask"].bool()
    t["input_ids"] = t["input_ids"].to(torch.int32)
    ids, mask, loss = check_inputs(t, vocab_size=2048, need_loss_mask=True, max_tokens=4096)
    assert ids.dtype == mask.dtype == loss.dtype == torch.int64
    t.pop("loss_mask")
    assert check_inputs(t, vocab_size=2048, need_loss_mask=False, max_tokens=4096)[2] is None


# ----------------------------------------------------------------------------- auth, bind


def test_token_matches_bearer_and_basic_only_with_the_right_token():
    digest = hashlib.sha256(b"s3cret").digest()
    basic = lambda s: "Basic " + base64.b64encode(s.encode()).decode()  # noqa: E731
    assert token_matches("Bearer s3cret", digest)
    assert token_matches("bearer  s3cret ", digest)
    assert token_matches(basic("trainer:s3cret"), digest)
    assert token_matches(basic(":s3cret"), digest)
    for bad in (None, "", "Bearer", "Bearer s3cre", "Bearer s3cret2", basic("s3cret"),
                basic("s3cret:x"), "Basic !!!", "Token s3cret", "s3cret"):
        assert not token_matches(bad, digest), bad


def test_loopback_rule(tmp_path):
    for host in ("127.0.0.1", "127.8.0.1", "::1", "localhost", "[::1]"):
        assert is_loopback(host)
        check_bind(host, None, False)
    for host in ("0.0.0.0", "10.0.0.5", "::", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(ValueError, match="refusing to serve on non-loopback"):
            check_bind(host, None, False)
        check_bind(host, "tok", False)
        check_bind(host, None, True)


def test_token_sources(tmp_path):
    f = tmp_path / "tok"
    f.write_text("  abc  \nignored\n")
    assert read_token(str(f), env={}) == "abc"
    assert read_token(None, env={"EAGLE3_TARGET_TOKEN": "xyz"}) == "xyz"
    assert read_token(None, env={}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token(str(tmp_path / "empty"), env={})
    with pytest.raises(ValueError, match="no such file"):
        read_token(str(tmp_path / "missing"), env={})
    with pytest.raises(ValueError, match="empty"):
        read_token(None, env={"EAGLE3_TARGET_TOKEN": " "})


# ----------------------------------------------------------------------------- worker


def _job(mode, seed, rows, seq, **kw):
    ids, mask, loss = make_inputs(seed, rows, seq)
    return Job(mode=mode, input_ids=ids, attention_mask=mask, loss_mask=loss, **kw)


def test_packing_takes_the_oldest_and_fills_the_budget_with_its_kind():
    w = EngineWorker(lambda: None, max_batch_tokens=100)
    jobs = [_job("logits", 0, 2, 20), _job("hidden", 1, 1, 10), _job("draft", 2, 1, 30),
            _job("topk", 3, 2, 10, k=2), _job("logits", 4, 1, 10)]
    w._pending.extend(jobs)
    first = w._take_batch_locked()
    # 2x20 + (3 rows x 30 = 90) fits; the next logits-kind job would make 5x30 > 100.
    assert first == [jobs[0], jobs[2]]
    assert list(w._pending) == [jobs[1], jobs[3], jobs[4]]
    assert w._take_batch_locked() == [jobs[1]]
    assert w._take_batch_locked() == [jobs[3], jobs[4]]
    assert not w._pending


def test_merging_stops_once_a_call_holds_merge_below_tokens():
    jobs = [_job("hidden", i, 1, 40) for i in range(4)]  # 40 padded tokens each

    def batches(**kw) -> list[int]:
        w = EngineWorker(lambda: None, max_batch_tokens=160, **kw)
        w._pending.extend(jobs)
        sizes = []
        while w._pending:
            sizes.append(len(w._take_batch_locked()))
        for j in jobs:  # fresh futures for the next policy
            j.future = type(j.future)()
        return sizes

    assert batches() == [2, 2]  # default: half the budget (80): 40 joins, 80 takes no more
    assert batches(merge_below_tokens=160) == [4]  # up to the budget
    assert batches(merge_below_tokens=41) == [2, 2]
    assert batches(merge_below_tokens=1) == [1, 1, 1, 1]  # never merges
    with pytest.raises(ValueError, match="merge_below_tokens"):
        EngineWorker(lambda: None, max_batch_tokens=160, merge_below_tokens=161)


def test_merge_below_tokens_is_checked_before_the_server_starts():
    from eagle3_target.server.settings import ServerSettings

    with pytest.raises(ValueError, match="--merge-below-tokens must be in 1..--max-batch-tokens"):
        ServerSettings(max_batch_tokens=100, merge_below_tokens=0)
    assert ServerSettings(max_batch_tokens=100, merge_below_tokens=100).merge_below_tokens == 100


def test_packing_skips_cancelled_jobs():
    w = EngineWorker(lambda: None, max_batch_tokens=100)
    a, b = _job("logits", 0, 1, 8), _job("logits", 1, 1, 8)
    a.future.cancel()
    w._pending.extend([a, b])
    assert w._take_batch_locked() == [b]


def test_a_merged_engine_call_equals_each_request_alone(reference):
    mapping = VocabMapping.from_ids(torch.arange(0, 2048, 7), 2048)
    jobs = [_job("logits", 10, 2, 24), _job("draft", 11, 3, 9, mapping=mapping),
            _job("topk", 12, 1, 17, k=5), _job("nemo", 13, 2, 5, mapping=mapping),
            _job("logits", 14, 1, 3, out_dtype=torch.bfloat16)]
    w = EngineWorker(lambda: reference, max_batch_tokens=4096)
    w.target = reference
    for j in jobs:
        j.future.set_running_or_notify_cancel()
    batches = []
    w._on_batch = lambda kind, n, padded, real, dt: batches.append((kind, n, padded))
    w._run(jobs)
    assert batches == [("logits", 5, 9 * 24)]
    for j in jobs:
        got = j.future.result(timeout=0)
        assert j.batch_requests == 5
        ref = reference.generate_batch(j.input_ids, j.attention_mask, j.loss_mask)
        dt = j.out_dtype or torch.float32
        tol = 1e-4 if dt == torch.float32 else 1e-2
        torch.testing.assert_close(got["aux_hidden_states"], ref.aux_hidden_states.to(dt),
                                   rtol=tol, atol=tol)
        if j.mode == "logits":
            torch.testing.assert_close(got["logits"], ref.logits.to(dt), rtol=tol, atol=tol)
        elif j.mode in ("draft", "nemo"):
            probs, pmask = compute_target_distribution(ref.logits, mapping.selected_token_ids,
                                                       mapping.selected_token_mask, ref.loss_mask)
            torch.testing.assert_close(got["target_probs"], probs, rtol=1e-4, atol=1e-5)
            assert torch.equal(got["position_mask"], pmask)
            if j.mode == "nemo":
                assert torch.equal(got["input_ids"], ref.input_ids)
                assert torch.equal(got["loss_mask"], ref.loss_mask)
        else:
            values, idx = ref.logits[:, :-1].topk(5, dim=-1)
            torch.testing.assert_close(got["topk_values"][:, :-1], values, rtol=1e-4, atol=1e-4)
            assert torch.equal(got["topk_indices"][:, :-1].long(), idx)
            assert not got["topk_values"][:, -1].any() and not got["logsumexp"][:, -1].any()


def test_a_failing_merged_call_is_retried_one_by_one(reference):
    """A row the engine chokes on fails its own request only."""
    w = EngineWorker(lambda: reference, max_batch_tokens=4096)
    w.target = reference
    good, bad = _job("logits", 20, 1, 8), _job("logits", 21, 1, 8)
    bad.input_ids[0, 0] = 10**6  # out of the embedding's range: the forward raises
    for j in (good, bad):
        j.future.set_running_or_notify_cancel()
    w._run([good, bad])
    ref = reference.generate_batch(good.input_ids, good.attention_mask, good.loss_mask)
    torch.testing.assert_close(good.future.result(timeout=0)["logits"], ref.logits)
    assert good.batch_requests == 1
    with pytest.raises(Exception):
        bad.future.result(timeout=0)


def test_worker_lifecycle_reports_load_failures():
    failed = threading.Event()

    def boom():
        raise RuntimeError("no weights")

    w = EngineWorker(boom, max_batch_tokens=10, on_failed=lambda e: failed.set())
    w.start()
    assert failed.wait(10)
    assert w.state == "failed" and "no weights" in str(w.error)


def test_postprocess_rejects_a_draft_job_without_mapping(reference):
    j = _job("draft", 0, 1, 4)
    logits, aux = reference.runner.forward_eagle3(j.input_ids, j.attention_mask)
    with pytest.raises(ValueError, match="vocab mapping"):
        postprocess(j, logits, aux)


def test_engine_args_pass_through_as_json_values():
    from eagle3_target.cli.common import parse_engine_args as _parse_engine_args

    assert _parse_engine_args(["mem-fraction-static=0.8", "tp_size=2", "attention_backend=fa3",
                               "flag=true", "cfg={\"a\": 1}"]) == {
        "mem_fraction_static": 0.8, "tp_size": 2, "attention_backend": "fa3", "flag": True,
        "cfg": {"a": 1}}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _parse_engine_args(["novalue"])


@pytest.mark.parametrize("mode", sorted(MODES) + [NEMO_GENERATE.name])
def test_each_mode_answers_exactly_the_tensors_its_table_row_lists(mode):
    # One table for both ends: the server's outputs are what the client checks for.
    v, h, b, s = 11, 4, 2, 5
    ids = torch.arange(b * s).reshape(b, s) % v
    mask = torch.ones(b, s, dtype=torch.int64)
    spec = NEMO_GENERATE if mode == NEMO_GENERATE.name else MODES[mode]
    job = Job(mode=mode, input_ids=ids, attention_mask=mask, loss_mask=mask,
              mapping=VocabMapping.from_ids(torch.tensor([0, 3, 5]), v), k=2 if spec.needs_k else None)
    out = torch.randn(b, s, h if spec.forward == "hidden" else v)
    res = postprocess(job, out, torch.randn(b, s, 3 * h))
    assert tuple(res) == spec.outputs


@pytest.fixture(scope="module")
def bf16_target(tiny_path):
    from eagle3_target import Eagle3TargetModel

    t = Eagle3TargetModel.from_pretrained(tiny_path, engine="hf", device="cpu", dtype="bfloat16")
    yield t
    t.close()


@pytest.mark.parametrize("mode", ["logits", "hidden", "draft", "topk", "nemo"])
def test_the_answer_budget_counts_what_the_answer_holds(bf16_target, mode):
    """The byte budget takes each answer's true size once the engine's float size is
    known (a bf16 answer counted at fp32 would take twice its room), and errs high
    before."""
    from eagle3_target.server.state import answer_bytes

    mapping = VocabMapping.from_ids(torch.arange(0, 2048, 5), 2048)
    kw = {"k": 4} if mode == "topk" else {"mapping": mapping} if mode in ("draft", "nemo") else {}
    job = _job(mode, 30, 3, 11, **kw)
    w = EngineWorker(lambda: bf16_target, max_batch_tokens=4096)
    w.target = bf16_target
    assert w.float_bytes(job.kind) is None
    before = answer_bytes(mode, job.input_ids, bf16_target, **kw)
    job.future.set_running_or_notify_cancel()
    w._run([job])
    got = job.future.result(timeout=0)
    job.wait_host()
    held = sum(v.numel() * v.element_size() for v in got.values())
    assert w.float_bytes(job.kind) == 2
    assert answer_bytes(mode, job.input_ids, bf16_target, float_bytes=w.float_bytes(job.kind), **kw) == held
    assert before >= held


def test_the_answer_budget_defaults_to_an_eighth_of_the_memory():
    from eagle3_target.server.settings import ServerSettings, default_response_bytes, memory_limit

    assert default_response_bytes(128 << 30) == 16 << 30  # a GPU host: six 2.3 GB logits answers
    assert default_response_bytes(24 << 30) == 4 << 30  # never below 4 GiB
    assert default_response_bytes(0) == 4 << 30
    assert ServerSettings().max_response_bytes == default_response_bytes(memory_limit())
    assert ServerSettings(max_response_bytes=1 << 20).max_response_bytes == 1 << 20
