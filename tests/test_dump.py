"""The offline dump, in process: the reader against generate_batch, split workers,
verify and repair, reruns, configuration checks, skipped rows, the target-source seam."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eagle3_target.cli import main as cli_main
from eagle3_target.data.chat import ChatEncoder
from eagle3_target.data.samples import iter_samples
from batches import draft_vocab_file, files_of, first_sample_chats
from eagle3_target.dump import DumpConfig, run_dump
from eagle3_target.dump.format import folder_lock, read_manifest
from eagle3_target.dump.verify import verify_dump
from eagle3_target.dump.reader import Eagle3Dataset, collate_eagle3, rebuild_supervision
from eagle3_target.vocab import compute_target_distribution

N_ROWS = 36


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return first_sample_chats(tmp_path_factory.mktemp("data"), N_ROWS)


@pytest.fixture(scope="module")
def mapping_file(tmp_path_factory, tiny_target, tok, data_file) -> Path:
    return draft_vocab_file(tmp_path_factory.mktemp("vocab"), tok, data_file, tiny_target.vocab_size,
                            [tok.eos_token_id, tok.pad_token_id])


def dump(out, target, tok, data, **kw):
    cfg = DumpConfig(out=str(out), data=[str(d) for d in data], **kw)
    return run_dump(cfg, source=target, tokenizer=tok, log=lambda s: None)


def stats_of(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(d).glob("shard*.safetensors")}


# --------------------------------------------------------------------------- reader


@pytest.mark.parametrize("mode", ["hidden", "logits", "draft"])
def test_reader_equals_generate_batch(tmp_path, tiny_target, tok, data_file, mapping_file, mode):
    from eagle3_target.vocab import VocabMapping

    mapping = VocabMapping.load(mapping_file)
    s = dump(tmp_path / "d", tiny_target, tok, [data_file], mode=mode, batch_tokens=1500,
             shard_size_mb=0.3, vocab=str(mapping_file) if mode == "draft" else None)
    assert s.complete and s.samples == N_ROWS and s.shards > 2
    assert verify_dump(tmp_path / "d").ok
    ds = Eagle3Dataset(tmp_path / "d")
    samples = list(iter_samples([data_file], ChatEncoder(tok, max_length=2048)))
    assert len(ds) == len(samples) == N_ROWS
    for i, smp in enumerate(samples):
        assert ds.row_index(i) == smp.row
        ids = torch.tensor([smp.input_ids])
        lm = torch.tensor([smp.loss_mask])
        ref = tiny_target.generate_batch(ids, torch.ones_like(ids), lm)
        got = ds[i]
        assert torch.equal(got["input_ids"], ref.input_ids[0])
        assert torch.equal(got["loss_mask"], ref.loss_mask[0])
        assert torch.equal(got["attention_mask"], ref.attention_mask[0])
        torch.testing.assert_close(got["aux_hidden_states"], ref.aux_hidden_states[0])
        if mode == "logits":
            torch.testing.assert_close(got["logits"], ref.logits[0])
        elif mode == "draft":
            probs, pmask = compute_target_distribution(ref.logits, mapping.selected_token_ids,
                                                       mapping.selected_token_mask, ref.loss_mask)
            torch.testing.assert_close(got["target_probs"], probs[0])
            assert torch.equal(got["position_mask"], pmask[0])
        else:
            _, hidden = tiny_target.generate_hidden(ids, torch.ones_like(ids), lm)
            h = hidden[0].clone()
            h[-1] = 0  # the zero tail generate_hidden leaves for a batch of one
            torch.testing.assert_close(got["hidden_states"], h)
    if mode == "hidden":
        # Rebuilt supervision: the stored LM head gives generate_batch's logits and the
        # draft distribution, per sample and on a collated batch.
        rebuilt = Eagle3Dataset(tmp_path / "d", lm_head=True)
        draft = Eagle3Dataset(tmp_path / "d", lm_head=True, vocab_mapping=mapping)
        for i in (0, 7, N_ROWS - 1):
            ids = torch.tensor([samples[i].input_ids])
            ref = tiny_target.generate_batch(ids, torch.ones_like(ids), torch.tensor([samples[i].loss_mask]))
            torch.testing.assert_close(rebuilt[i]["logits"], ref.logits[0], rtol=1e-5, atol=1e-5)
            probs, pmask = compute_target_distribution(ref.logits, mapping.selected_token_ids,
                                                       mapping.selected_token_mask, ref.loss_mask)
            torch.testing.assert_close(draft[i]["target_probs"], probs[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(draft[i]["position_mask"], pmask[0])
        batch = collate_eagle3([ds[0], ds[1], ds[2]])
        out = rebuild_supervision(batch, rebuilt.lm_head)
        for r in range(3):
            n = int(batch["attention_mask"][r].sum())
            torch.testing.assert_close(out["logits"][r, :n], rebuilt[r]["logits"], rtol=1e-5, atol=1e-5)
            assert not out["logits"][r, n - 1:].any()


def test_collate_right_pads(tmp_path, tiny_target, tok, data_file):
    dump(tmp_path / "d", tiny_target, tok, [data_file], mode="logits")
    ds = Eagle3Dataset(tmp_path / "d")
    items = [ds[i] for i in (3, 0, 5)]
    b = collate_eagle3(items)
    lengths = [x["input_ids"].shape[0] for x in items]
    assert b["input_ids"].shape == (3, max(lengths))
    assert b["aux_hidden_states"].shape == (3, max(lengths), 3 * tiny_target.hidden_size)
    assert b["attention_mask"].sum(1).tolist() == lengths
    for r, x in enumerate(items):
        n = lengths[r]
        assert torch.equal(b["logits"][r, :n], x["logits"])
        assert not b["logits"][r, n:].any() and not b["loss_mask"][r, n:].any()
    with pytest.raises(ValueError):
        collate_eagle3([])
    # Worker processes open their own memory maps.
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate_eagle3, num_workers=2)
    seen = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in loader])
    assert torch.equal(seen, torch.cat([ds[i]["input_ids"] for i in range(len(ds))]))


# --------------------------------------------------------------------------- workers


def test_workers_together_equal_one_worker(tmp_path, tiny_target, tok, data_file):
    # One sample per forward, so every sample is computed identically in both layouts.
    one = dump(tmp_path / "one", tiny_target, tok, [data_file], mode="logits", batch_tokens=1, shard_size_mb=0.2)
    rows_by_worker = []
    for i in range(3):
        s = dump(tmp_path / "split", tiny_target, tok, [data_file], mode="logits", batch_tokens=1,
                 shard_size_mb=0.2, num_shards=3, shard_index=i)
        assert s.complete
        m = read_manifest(tmp_path / "split" / f"manifest-{i:05d}-of-00003.json")
        ds_rows = []
        for e in m["shards"]:
            from safetensors import safe_open

            with safe_open(str(tmp_path / "split" / e["file"]), framework="pt") as f:
                ds_rows += f.get_tensor("row_index").tolist()
        assert all(r % 3 == i for r in ds_rows)
        rows_by_worker.append(set(ds_rows))
        if i < 2:  # not all workers done: the reader refuses unless asked
            with pytest.raises(ValueError, match="incomplete"):
                Eagle3Dataset(tmp_path / "split")
            assert len(Eagle3Dataset(tmp_path / "split", allow_incomplete=True)) == len(set().union(*rows_by_worker))
    assert not (rows_by_worker[0] & rows_by_worker[1]) and not (rows_by_worker[1] & rows_by_worker[2])
    assert verify_dump(tmp_path / "split").ok
    a, b = Eagle3Dataset(tmp_path / "one"), Eagle3Dataset(tmp_path / "split")
    assert len(a) == len(b) == one.samples == N_ROWS
    for i in range(len(a)):
        assert a.row_index(i) == b.row_index(i)
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (i, k)


# --------------------------------------------------------------------------- verify / repair


def test_corrupt_shard_fails_verify_and_a_rerun_repairs_it(tmp_path, tiny_target, tok, data_file, capsys):
    d = tmp_path / "d"
    dump(d, tiny_target, tok, [data_file], mode="hidden", shard_size_mb=0.3, batch_tokens=1500)
    ref = files_of(d)
    shards = sorted(n for n in ref if n.startswith("shard"))
    assert len(shards) >= 3
    victim = d / shards[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    (d / shards[2]).unlink()

    assert cli_main(["verify", str(d)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {shards[1]}: sha256 mismatch" in out and f"FAIL {shards[2]}: missing" in out
    assert f"ok   {shards[0]}" in out and "FAILED" in out

    before = stats_of(d)
    s = dump(d, tiny_target, tok, [data_file], mode="hidden", shard_size_mb=0.3, batch_tokens=1500)
    assert (s.shards_repaired, s.shards_written) == (2, 0)
    assert files_of(d) == ref
    after = stats_of(d)
    untouched = [n for n in shards if n not in (shards[1], shards[2])]
    assert all(before[n] == after[n] for n in untouched)
    assert cli_main(["verify", str(d)]) == 0


def test_verify_checks_contents_not_only_hashes(tmp_path, tiny_target, tok, data_file):
    """A shard rewritten with a consistent hash but wrong contents still fails."""
    from safetensors.torch import load_file, save_file
    import hashlib

    d = tmp_path / "d"
    dump(d, tiny_target, tok, [data_file], mode="logits", shard_size_mb=0.3, batch_tokens=1500)
    m = read_manifest(d / "manifest.json")
    e = m["shards"][0]
    t = load_file(str(d / e["file"]))
    t["logits"][3, 5] = float("nan")
    t["loss_mask"][4] = 1 - t["loss_mask"][4]
    save_file(t, str(d / e["file"]))
    e["bytes"] = (d / e["file"]).stat().st_size
    e["sha256"] = hashlib.sha256((d / e["file"]).read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(m))
    r = verify_dump(d)
    assert not r.ok
    text = "\n".join(r.problems)
    assert "logits has NaN or Inf" in text and "supervised tokens, manifest says" in text


def test_rerun_of_a_finished_dump_changes_nothing(tmp_path, tiny_target, tok, data_file):
    d = tmp_path / "d"
    dump(d, tiny_target, tok, [data_file], mode="hidden", shard_size_mb=0.3)
    ref, st = files_of(d), stats_of(d)
    mstat = (d / "manifest.json").stat().st_mtime_ns
    s = dump(d, tiny_target, tok, [data_file], mode="hidden", shard_size_mb=0.3)
    assert s.complete and (s.shards_written, s.shards_repaired, s.run_samples) == (0, 0, 0)
    assert files_of(d) == ref and stats_of(d) == st
    assert (d / "manifest.json").stat().st_mtime_ns == mstat


def test_orphan_shard_is_adopted_not_rewritten(tmp_path, tiny_target, tok, data_file):
    """A kill between a shard's rename and the manifest update leaves a finished shard the
    manifest does not list; the rerun lists it without rewriting it."""
    d = tmp_path / "d"
    dump(d, tiny_target, tok, [data_file], mode="logits", shard_size_mb=0.3, batch_tokens=1500)
    ref, st = files_of(d), stats_of(d)
    m = read_manifest(d / "manifest.json")
    m["shards"] = m["shards"][:2]
    m.update(complete=False, tail=None, summary=None)
    (d / "manifest.json").write_text(json.dumps(m))
    names = sorted(n for n in ref if n.startswith("shard"))
    for n in names[3:]:
        (d / n).unlink()  # shards after the orphan were never written
    s = dump(d, tiny_target, tok, [data_file], mode="logits", shard_size_mb=0.3, batch_tokens=1500)
    assert s.shards_adopted == 1 and s.shards_written == len(names) - 3
    assert files_of(d) == ref
    assert all(stats_of(d)[n] == st[n] for n in names[:3])


# --------------------------------------------------------------------------- bad input


def test_changed_configuration_is_refused_and_changes_nothing(tmp_path, tiny_target, tok, data_file):
    d = tmp_path / "d"
    dump(d, tiny_target, tok, [data_file], mode="hidden", shard_size_mb=0.3)
    ref, st = files_of(d), stats_of(d)
    with pytest.raises(ValueError, match="differs in: batch_tokens, max_length"):
        dump(d, tiny_target, tok, [data_file], mode="hidden", shard_size_mb=0.3, max_length=64, batch_tokens=100)
    other = data_file.parent / "other.jsonl"
    other.write_text(data_file.read_text().replace("model", "modal"))
    with pytest.raises(ValueError, match="differs in: data"):
        dump(d, tiny_target, tok, [other], mode="hidden", shard_size_mb=0.3)
    assert files_of(d) == ref and stats_of(d) == st


def test_bad_arguments(tmp_path, tiny_target, tok, data_file):
    with pytest.raises(ValueError, match="needs --vocab"):
        DumpConfig(out=str(tmp_path), mode="draft")
    with pytest.raises(ValueError, match="unknown mode"):
        DumpConfig(out=str(tmp_path), mode="everything")
    with pytest.raises(ValueError, match="shard_index"):
        DumpConfig(out=str(tmp_path), num_shards=2, shard_index=2)
    with pytest.raises(ValueError, match="does not exist"):
        dump(tmp_path / "x", tiny_target, tok, [tmp_path / "missing.jsonl"])
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "shard-00000.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="no manifest.json"):
        dump(tmp_path / "y", tiny_target, tok, [data_file])
    assert not (tmp_path / "x").exists()


def test_skipped_rows_are_reported_and_strict_refuses(tmp_path, tiny_target, tok, data_file):
    lines = data_file.read_text().splitlines()[:6]
    bad = lines[:2] + ["{oops", json.dumps({"messages": [{"role": "user", "content": "no answer"}]})] + lines[2:]
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(bad) + "\n")
    s = dump(tmp_path / "d", tiny_target, tok, [p], mode="hidden")
    assert s.samples == 6
    assert s.skipped == {"malformed": {"not JSON": 1}, "zero_supervision": {"no assistant turn": 1}}
    assert s.examples["zero_supervision"][0]["where"] == "mixed.jsonl:4"
    text = "\n".join(s.lines())
    assert "malformed rows skipped: 1 (not JSON: 1)" in text and "mixed.jsonl:4 (row 3)" in text
    ds = Eagle3Dataset(tmp_path / "d")
    assert [ds.row_index(i) for i in range(len(ds))] == [0, 1, 4, 5, 6, 7]
    assert read_manifest(tmp_path / "d" / "manifest.json")["summary"]["skipped"] == s.skipped
    with pytest.raises(ValueError, match="--strict: malformed rows skipped: 1"):
        dump(tmp_path / "strict", tiny_target, tok, [p], mode="hidden", strict=True)
    assert not (tmp_path / "strict").exists()


# --------------------------------------------------------------------------- the source seam


class RemoteLike:
    """A target with only the remote client's surface (no ``.model``, no hidden size or
    dtype: the dump probes them), which
    projects onto the draft vocabulary itself once a mapping is set, as a server would.
    Its padded positions carry garbage, as a real batched engine's do."""

    def __init__(self, target):
        self._t = target
        self.aux_layer_ids = target.aux_layer_ids
        self.vocab_size = target.vocab_size
        self.mapping = None
        # Like the real client, safe to call from several threads (the in-process
        # runner it wraps is not: its capture hooks are shared).
        import threading

        self._lock = threading.Lock()

    def set_vocab_mapping(self, mapping):
        self.mapping = mapping

    def generate_batch(self, input_ids, attention_mask, loss_mask):
        with self._lock:
            b = self._t.generate_batch(input_ids, attention_mask, loss_mask)
        if self.mapping is None:
            return b
        probs, pmask = compute_target_distribution(b.logits, self.mapping.selected_token_ids,
                                                   self.mapping.selected_token_mask, b.loss_mask)
        probs[:, -1] = 0.5  # garbage where the dump must put its own tail
        from eagle3_target.contract import Eagle3TargetBatch

        return Eagle3TargetBatch(aux_hidden_states=b.aux_hidden_states, input_ids=b.input_ids,
                                 attention_mask=b.attention_mask, loss_mask=b.loss_mask,
                                 target_probs=probs, position_mask=pmask)

    def generate_hidden(self, input_ids, attention_mask, loss_mask):
        with self._lock:
            return self._t.generate_hidden(input_ids, attention_mask, loss_mask)

    def lm_head(self):
        return self._t.lm_head()

    def close(self):
        pass


@pytest.mark.parametrize("mode", ["hidden", "draft"])
def test_a_remote_like_source_gives_the_same_dataset(tmp_path, tiny_target, tok, data_file, mapping_file, mode):
    vocab = str(mapping_file) if mode == "draft" else None
    dump(tmp_path / "a", tiny_target, tok, [data_file], mode=mode, vocab=vocab, batch_tokens=1)
    dump(tmp_path / "b", RemoteLike(tiny_target), tok, [data_file], mode=mode, vocab=vocab, batch_tokens=1,
         prefetch=3)  # batches computed ahead on threads: same bytes, same order
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")


def test_hidden_mode_stores_the_packed_outputs_with_the_padded_paths_bytes(tmp_path, tiny_target, tok,
                                                                          data_file, monkeypatch):
    """In process the hidden mode asks for the real tokens only (no padded copy to gather
    back); batches of several rows of unequal length give the bytes of the padded path."""
    rows_per_call = []
    real = tiny_target.generate_hidden_packed

    def spy(ids, attn, lmask):
        rows_per_call.append(sorted(set(attn.sum(1).tolist())))
        return real(ids, attn, lmask)

    monkeypatch.setattr(tiny_target, "generate_hidden_packed", spy)
    dump(tmp_path / "packed", tiny_target, tok, [data_file], mode="hidden", batch_tokens=2048)
    dump(tmp_path / "padded", RemoteLike(tiny_target), tok, [data_file], mode="hidden", batch_tokens=2048)
    assert rows_per_call and max(len(n) for n in rows_per_call) > 1  # rows padded to the longest
    assert files_of(tmp_path / "packed") == files_of(tmp_path / "padded")


class Watched:
    """The in-process target, recording the thread of each forward and how many ran at
    once; ``fail_at`` makes that call (1-based) raise as an engine out of memory would."""

    def __init__(self, target, fail_at: int | None = None):
        import threading

        self._t, self.fail_at = target, fail_at
        self.aux_layer_ids = target.aux_layer_ids
        self.vocab_size = target.vocab_size
        self.threads: list[str] = []
        self.running = self.most_at_once = 0
        self._count = threading.Lock()

    def generate_batch(self, input_ids, attention_mask, loss_mask):
        import threading
        import time

        with self._count:
            self.threads.append(threading.current_thread().name)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            calls = len(self.threads)
        try:
            time.sleep(0.02)  # long enough for a second forward to overlap, if one could
            if calls == self.fail_at:
                raise RuntimeError("CUDA out of memory (as raised by the engine in this test)")
            return self._t.generate_batch(input_ids, attention_mask, loss_mask)
        finally:
            with self._count:
                self.running -= 1

    def close(self):
        pass


def dump_threads(before: frozenset = frozenset()) -> list[str]:
    """The eagle3 threads alive now that were not alive in ``before`` (another test's
    long-lived threads, a client's deadline timer say, are no concern of the dump)."""
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("eagle3-") and t not in before]


def alive() -> frozenset:
    import threading

    return frozenset(threading.enumerate())


def test_the_forwards_run_on_an_engine_thread_one_at_a_time(tmp_path, tiny_target, tok, data_file):
    """By default the target's forwards run back to back on a thread of their own (the
    main thread waits for host copies and cuts shards meanwhile), never two at once,
    and give the bytes of forwards run on the main thread (``--prefetch 0``)."""
    kw = dict(mode="logits", batch_tokens=1500, shard_size_mb=0.3)
    dump(tmp_path / "a", tiny_target, tok, [data_file], prefetch=0, **kw)
    watched = Watched(tiny_target)
    before = alive()
    s = dump(tmp_path / "b", watched, tok, [data_file], **kw)
    assert s.complete and s.shards > 2 and len(watched.threads) > 3
    assert set(watched.threads[1:]) == {"eagle3-engine"}  # the first call probes the dtype
    assert watched.most_at_once == 1
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    assert dump_threads(before) == []  # every thread of the dump has ended
    dump(tmp_path / "c", tiny_target, tok, [data_file], prefetch=1, **kw)  # an in-process target
    assert files_of(tmp_path / "a") == files_of(tmp_path / "c")
    with pytest.raises(ValueError, match="one forward at a time"):
        dump(tmp_path / "d", tiny_target, tok, [data_file], prefetch=2)
    assert not (tmp_path / "d").exists()


def test_an_engine_error_on_the_engine_thread_stops_the_dump_and_a_rerun_finishes_it(
        tmp_path, tiny_target, tok, data_file):
    """The engine thread's error reaches the caller as raised, the shards finished before
    it stay listed and intact, no thread is left running, and the same command again
    continues to the bytes of a dump that never failed."""
    kw = dict(mode="logits", batch_tokens=1500, shard_size_mb=0.3)
    dump(tmp_path / "ref", tiny_target, tok, [data_file], **kw)
    out = tmp_path / "d"
    before = alive()
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        dump(out, Watched(tiny_target, fail_at=4), tok, [data_file], **kw)
    assert dump_threads(before) == []
    kept = read_manifest(out / "manifest.json")["shards"]
    assert 0 < len(kept) < len(read_manifest(tmp_path / "ref" / "manifest.json")["shards"])
    report = verify_dump(out)  # the kept shards check out; only the end is missing
    assert report.problems == ["manifest.json: dump not finished (rerun the same dump command)"]
    s = dump(out, tiny_target, tok, [data_file], **kw)
    assert s.complete
    assert files_of(out) == files_of(tmp_path / "ref")


def test_pin_threads_are_checked_and_a_cpu_dump_leaves_torch_alone(tmp_path, tiny_target, tok, data_file,
                                                                   monkeypatch):
    for bad in (-1, 6, 256, True):
        with pytest.raises(ValueError, match="pin_threads"):
            DumpConfig(out=str(tmp_path / "x"), pin_threads=bad)
    assert not (tmp_path / "x").exists()
    # The pinned-pool setting is process-wide: a dump whose target runs on the CPU has
    # nothing to pin and must not change it.
    seen: list[str] = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", seen.append, raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    dump(tmp_path / "a", tiny_target, tok, [data_file], pin_threads=16)
    assert seen == []
    # On a GPU the LM head's copy and the batch copies both ask; torch is told once.
    from eagle3_target.dump.host import HostCopier as HostCopier

    copier = HostCopier(pin_threads=16)
    copier.prepare_pinning()
    copier.prepare_pinning()
    assert seen == ["pinned_use_cuda_host_register:True,pinned_num_register_threads:16"]


def test_load_time_counts_from_the_start_so_the_rate_after_it_excludes_the_tokenizer(
        tmp_path, tiny_model_dir, data_file, monkeypatch):
    # A dump that loads its own target reports the rate after the load; the tokenizer's
    # load (seconds of transformers imports on a GPU host) comes before it and must fall
    # on the load's side, not in the dump's rate.
    import time

    import eagle3_target.data.tokenizer as chat

    real = chat.load_tokenizer

    def slow(*a, **k):
        time.sleep(2.0)  # longer than the tiny model's own load
        return real(*a, **k)

    monkeypatch.setattr(chat, "load_tokenizer", slow)
    s = run_dump(DumpConfig(out=str(tmp_path / "d"), data=[str(data_file)], model=str(tiny_model_dir)),
                 log=lambda m: None)
    assert s.complete and s.run_samples > 0
    assert 2.0 <= s.run_load_seconds < s.run_seconds
    assert "after loading the target" in "\n".join(s.lines())


def test_a_second_dump_on_the_same_folder_is_refused_and_changes_nothing(tmp_path, tiny_target, tok, data_file):
    out = tmp_path / "d"
    out.mkdir()
    with folder_lock(out, ".lock-00000-of-00001", "held by this test"):  # another writer's lock
        with pytest.raises(ValueError, match=r"another dump is writing .*d \(worker 0 of 1\)"):
            dump(out, tiny_target, tok, [data_file])
        assert sorted(p.name for p in out.iterdir()) == [".lock-00000-of-00001"]
    dump(out, tiny_target, tok, [data_file])  # once the lock is gone the same call runs
    assert read_manifest(out / "manifest.json")["complete"]
