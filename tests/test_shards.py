"""The dump's byte-level helpers: streamed safetensors equal the library's bytes, the LM
head round-trips, and the batch-to-samples gather keeps exactly the real tokens."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from batches import right_padded_batch
from eagle3_target.contract import LMHead
from eagle3_target.contract import zero_tail
from eagle3_target.dump import DumpConfig
from eagle3_target.engines.packing import gather_rows
from eagle3_target.dump.format import (
    ShardJob,
    header_meta,
    load_lm_head,
    pack_shard,
    save_lm_head,
    stream_to_file,
)
from eagle3_target.dump.host import threaded_pinning
from eagle3_target.wire.st_stream import layout_pieces


def _samples(lengths, h=6, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        out.append({
            "input_ids": torch.randint(0, v, (n,), generator=g),
            "loss_mask": torch.randint(0, 2, (n,), generator=g).to(torch.uint8),
            "aux_hidden_states": torch.randn(n, 3 * h, generator=g).to(torch.bfloat16),
            "target_probs": torch.rand(n, 5, generator=g),
            "position_mask": torch.rand(n, generator=g) > 0.5,
        })
    return out


def test_packed_shard_is_byte_identical_to_safetensors_save():
    lengths = [3, 1, 7]
    samples = _samples(lengths)
    fields = list(samples[0])
    job = ShardJob(4, "shard-00004.safetensors", {"index": 4, "rows": [10, 16]}, samples, [10, 12, 15])
    got = pack_shard(job, "c" * 64, fields)

    whole = {k: torch.cat([s[k] for s in samples]) for k in fields}
    whole["offsets"] = torch.tensor([0, 3, 4, 11])
    whole["row_index"] = torch.tensor([10, 12, 15])
    meta = header_meta({"format": "eagle3-dump-v1", "config_sha256": "c" * 64, "entry": job.entry})
    assert got == save(whole, metadata=meta)
    back = load(got)
    assert set(back) == set(whole)
    for k in whole:
        assert torch.equal(back[k], whole[k]), k


@pytest.mark.parametrize("parallel_from", [0, 1 << 40])  # sha256 on a second thread, or in line
def test_streamed_file_hash_and_size(tmp_path, parallel_from):
    import hashlib

    parts = {"a": [torch.arange(5), torch.arange(3)], "b": [torch.ones(2, 2, dtype=torch.float16)]}
    header, pieces = layout_pieces(parts, None)
    sha, size = stream_to_file(tmp_path / "x.safetensors", header, pieces, parallel_from=parallel_from)
    data = (tmp_path / "x.safetensors").read_bytes()
    assert data == save({"a": torch.cat(parts["a"]), "b": parts["b"][0]})
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))


@pytest.mark.parametrize("bias", [False, True])
def test_lm_head_file_equals_the_library_and_round_trips(tmp_path, bias):
    g = torch.Generator().manual_seed(1)
    head = LMHead(weight=torch.randn(13, 4, generator=g).to(torch.bfloat16),
                  bias=torch.randn(13, generator=g).to(torch.bfloat16) if bias else None,
                  scale=0.5, softcap=30.0 if bias else None)
    sha, size = save_lm_head(tmp_path / "lm_head.safetensors", head, "t")
    data = (tmp_path / "lm_head.safetensors").read_bytes()
    tensors = {"weight": head.weight} | ({"bias": head.bias} if bias else {})
    meta = header_meta({"format": "eagle3-dump-v1", "scale": 0.5, "softcap": head.softcap})
    assert data == save(tensors, metadata=meta) and size == len(data)
    back = load_lm_head(tmp_path / "lm_head.safetensors")
    assert torch.equal(back.weight, head.weight) and back.scale == 0.5 and back.softcap == head.softcap
    assert (back.bias is None) == (not bias)
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("shape", [(4, 9, 5), (4, 9)])
def test_real_tokens_and_zero_tails_match_per_row_slicing(shape):
    lengths = [9, 1, 4, 6]
    t = torch.randn(*shape)
    want_tails = t.clone()
    for r, n in enumerate(lengths):
        want_tails[r, n - 1:] = 0
    assert torch.equal(zero_tail(t.clone(), lengths), want_tails)
    _, mask = right_padded_batch(lengths, vocab=2)
    flat = gather_rows({"x": t}, mask)["x"]
    assert torch.equal(flat, torch.cat([t[r, :n] for r, n in enumerate(lengths)]))
    assert flat.is_contiguous() and flat.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


def test_writer_threads_default_to_half_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    assert DumpConfig(out=str(tmp_path)).writer_threads == 8
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert DumpConfig(out=str(tmp_path)).writer_threads == 2
    assert DumpConfig(out=str(tmp_path), writer_threads=3).writer_threads == 3
    with pytest.raises(ValueError, match="writer_threads"):
        DumpConfig(out=str(tmp_path), writer_threads=0)


def test_read_ahead_keeps_order_raises_the_producers_error_and_stops_with_the_consumer():
    import threading
    import time

    from eagle3_target.dump import read_ahead

    assert list(read_ahead(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("row 7: bad json")

    it = read_ahead(failing(), depth=2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="row 7"):
        next(it)

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = set(threading.enumerate())
    it = read_ahead(endless(), depth=3)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    it.close()  # a consumer that stops early (the repair path takes one shard)
    time.sleep(0.3)
    n = len(produced)
    time.sleep(0.3)
    assert len(produced) == n <= 5 + 3 + 2  # the producer stopped, a bounded way ahead
    assert not [t for t in set(threading.enumerate()) - before if t.name == "eagle3-read-ahead"]


def test_threaded_pinning_sets_torch_allocator_unless_the_user_did(monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", seen.append, raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert threaded_pinning(0) is None and seen == []
    conf = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
    assert threaded_pinning(8) == conf and seen == [conf]
    with pytest.raises(ValueError, match="power of two"):
        threaded_pinning(6)
    # The user's own pinned_ option wins; other options of theirs do not block ours.
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert threaded_pinning(4) is not None and len(seen) == 2
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "pinned_num_register_threads:2")
    assert threaded_pinning(4) is None and len(seen) == 2
