"""Tensor parallelism of the SGLang engine on the CPU: rank 0 in this process, rank 1 in
a real worker process, over the fake SGLang releases, whose vocab-parallel LM head and
embedding gather over a gloo world as SGLang's do over NCCL. TP=2 must return what TP=1
returns; a killed worker ends the runner with an error naming it, never a hang."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from eagle3_target import Eagle3TargetModel
from eagle3_target.engines import sglang as sg
from eagle3_target.engines.tp import TPWorkerError
from sglang_helpers import ragged, use_fake
from tp_fakes import FAKE_RELEASE_ENV

HERE = str(Path(__file__).resolve().parent)
RELEASES = ("0.5.9", "0.5.16", "0.5.23")  # rank arguments, ParallelState, bootstrap + publish
AUX = [1, 3, 4]


@pytest.fixture(params=RELEASES)
def two_gpus(request, monkeypatch):
    use_fake(monkeypatch, request.param)
    monkeypatch.setattr(sg, "_cuda_device_count", lambda: 2)
    monkeypatch.setattr(sg, "WORKER_BUILDER", "tp_fakes:fake_sglang_rank")
    monkeypatch.setenv(FAKE_RELEASE_ENV, request.param)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    return request.param


def _everything(r, ids, mask):
    r.set_aux_layers(AUX)
    logits, aux = r.forward_eagle3(ids, mask)
    hidden, aux_h = r.forward_eagle3_hidden(ids, mask)
    prenorm, _ = r.forward_eagle3_prenorm(ids, mask)
    head = r.lm_head()
    return dict(logits=logits, aux=aux, aux_h=aux_h, hidden=hidden, prenorm=prenorm,
                embeddings=r.input_embedding_weight(), head=head.weight)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_tp2_returns_what_tp1_returns(two_gpus, tiny_path):
    ids, mask = ragged([7, 12, 3], S=12, seed=0)
    one = sg.build(tiny_path, dtype="float32")
    assert one.tp_size == 1 and one.tp_worker_pids == []
    want = _everything(one, ids, mask)
    one.close()
    two = sg.build(tiny_path, dtype="float32", tp_size=2, max_batch_tokens=16, max_batch_rows=2,
                   page_size=1)  # a small pool: the batch runs as several extends, each mirrored
    pids = two.tp_worker_pids
    try:
        assert two.tp_size == 2 and len(pids) == 1
        got = _everything(two, ids, mask)
        assert two.extends > 3  # several extends per call, all mirrored to the worker
    finally:
        two.close()
    for k in want:  # the vocab shards gathered over the world, the replicated stream
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert all(_gone(p) for p in pids)
    assert not torch.distributed.is_initialized()  # closed cleanly: a later build can start


def test_the_contract_builds_a_tp_world(two_gpus, tiny_path):
    with Eagle3TargetModel.from_pretrained(tiny_path, engine="sglang", dtype="float32", tp_size=2) as t:
        ids, mask = ragged([5, 9], S=9, seed=1)
        batch = t.generate_batch(ids, mask, mask)
        assert batch.logits.shape == (2, 9, t.vocab_size)
        pids = t.runner.tp_worker_pids
    assert pids and all(_gone(p) for p in pids)


def test_a_killed_worker_ends_the_runner_with_an_error_naming_it(two_gpus, tiny_path):
    r = sg.build(tiny_path, dtype="float32", tp_size=2)
    try:
        r.set_aux_layers(AUX)
        ids, mask = ragged([7, 12, 3], S=12, seed=0)
        r.forward_eagle3(ids, mask)
        (pid,) = r.tp_worker_pids
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        t0 = time.monotonic()
        with pytest.raises(TPWorkerError, match="rank 1 exited with code -9"):
            r.forward_eagle3(ids, mask)
        assert time.monotonic() - t0 < 30
        with pytest.raises(TPWorkerError, match="stopped"):
            r.forward_eagle3_hidden(ids, mask)
    finally:
        r.close()
    assert not torch.distributed.is_initialized()


def test_tp_needs_a_gpu_for_each_rank(two_gpus, tiny_path):
    with pytest.raises(ValueError, match="tp_size 3 needs GPUs 0..2 but only 2"):
        sg.build(tiny_path, dtype="float32", tp_size=3)


def test_a_dump_with_a_tp_target_stores_the_bytes_a_tp1_dump_stores(two_gpus, tiny_path, tok, tmp_path):
    from batches import files_of, first_sample_chats
    from eagle3_target.dump import DumpConfig, run_dump

    data = first_sample_chats(tmp_path, 8)
    outs = {}
    for tp in (1, 2):
        cfg = DumpConfig(out=str(tmp_path / f"tp{tp}"), data=[str(data)], model=tiny_path, engine="sglang",
                         dtype="float32", engine_args={"tp_size": tp} if tp > 1 else {}, render="thread",
                         progress=False)
        s = run_dump(cfg, tokenizer=tok, log=lambda m: None)
        assert s.complete and s.samples == 8
        outs[tp] = files_of(tmp_path / f"tp{tp}")
    shards = [n for n in outs[1] if n.startswith("shard")]
    assert shards and all(outs[2][n] == outs[1][n] for n in shards)


def test_the_transformers_engine_refuses_tp_with_the_flag_to_use(tiny_path, tmp_path, capsys):
    from eagle3_target.cli import main

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"input_ids": [1, 2, 3]}\n')
    code = main(["forward", "--model", tiny_path, "--input", str(rows), "--out", str(tmp_path / "o"),
                 "--tp-size", "2"])
    assert code == 2 and "--engine sglang --tp-size N" in capsys.readouterr().err
