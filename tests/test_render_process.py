"""The render process (``--render process``): a real child process renders exactly what
this process would, in row order, from any handover row; its failures are either
harmless (never ready: this process renders) or errors that name it; it dies with its
parent; and a dump that uses it is byte-identical to one that does not."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import eagle3_target.dump.render as rp
from batches import files_of, first_sample_chats
from eagle3_target.data.chat import ChatEncoder
from eagle3_target.data.samples import Sample, Skipped, iter_samples
from eagle3_target.data.rows import sample_data_path
from eagle3_target.data.tokenizer import tokenizer_class_name, tokenizer_fingerprint
from eagle3_target.dump.render import RenderJob, RenderProcess, iter_samples_handover
from eagle3_target.dump import DumpConfig, run_dump


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory) -> Path:
    """Sample chats (OpenAI and ShareGPT) with malformed and unsupervised rows among them."""
    good = sample_data_path().read_text().splitlines()[:40]
    share = sample_data_path("sample_sharegpt.jsonl").read_text().splitlines()[:10]
    bad = ["{not json", json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
           json.dumps({"conversations": [{"from": "alien", "value": "hi"}]})]
    lines = good[:15] + bad[:1] + share + bad[1:] + good[15:]
    p = tmp_path_factory.mktemp("mixed") / "mixed.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture()
def child(tiny_model_dir, tok):
    with RenderProcess(str(tiny_model_dir), tokenizer_fingerprint(tok), tokenizer_class_name(tok)) as c:
        assert c.wait_ready(120), c.failure
        yield c


@pytest.mark.parametrize("template_mask", [True, False])
def test_child_renders_what_this_process_renders(child, tok, mixed_file, template_mask):
    enc = ChatEncoder(tok, max_length=96, vocab_size=len(tok), use_template_mask=template_mask)
    assert enc.use_template_mask is template_mask
    keep = lambda i: i % 3 == 0  # noqa: E731
    want = list(iter_samples([mixed_file], enc, start=4, keep=keep))
    got = list(child.samples(RenderJob.of([mixed_file], enc, 4, num_shards=3, shard_index=0)))
    assert got == want
    assert {type(x) for x in got} == {Sample, Skipped}  # both kinds crossed the pipe
    assert child.rows == len(want) and child.first_row == 4


def test_child_reads_parquet_and_jsonl_across_files_like_this_process(child, tok, mixed_file, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in sample_data_path().read_text().splitlines()[:30]]
    rows = [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    paths = [tmp_path / "a.parquet", mixed_file]
    enc = ChatEncoder(tok, max_length=128)
    want = list(iter_samples(paths, enc, start=20, keep=lambda i: i % 2 == 0))
    got = list(child.samples(RenderJob.of(paths, enc, 20, num_shards=2, shard_index=0)))
    assert got == want and {s.row for s in got} >= {20, 28, 30, 32}  # rows from both files


def test_handover_at_any_row_gives_the_same_stream(tiny_model_dir, tok, mixed_file, monkeypatch):
    enc = ChatEncoder(tok, max_length=96)
    want = list(iter_samples([mixed_file], enc))
    monkeypatch.setattr(rp, "POLL_SECONDS", 0.0)  # ask at every row
    for k in (0, 1, 16, len(want) - 1):
        with RenderProcess(str(tiny_model_dir), tokenizer_fingerprint(tok), tokenizer_class_name(tok)) as c:
            assert c.wait_ready(120)
            polls = [0]
            real_ready = c.ready

            def ready_after_k() -> bool:
                polls[0] += 1
                return polls[0] > k and real_ready()

            c.ready = ready_after_k
            got = list(iter_samples_handover([mixed_file], enc, child=c))
            assert got == want, k
            assert c.first_row == want[k].row and c.rows == len(want) - k


def test_a_child_whose_render_differs_is_dropped_at_the_handover(tiny_model_dir, tok, mixed_file, monkeypatch):
    enc = ChatEncoder(tok, max_length=48)
    want = list(iter_samples([mixed_file], enc))
    of = RenderJob.of

    def longer(paths, encoder, start, num_shards, shard_index):  # the child truncates elsewhere
        job = of(paths, encoder, start, num_shards, shard_index)
        return dataclasses.replace(job, max_length=96)

    monkeypatch.setattr(RenderJob, "of", staticmethod(longer))
    with RenderProcess(str(tiny_model_dir), tokenizer_fingerprint(tok), tokenizer_class_name(tok)) as c:
        assert c.wait_ready(120)
        got = list(iter_samples_handover([mixed_file], enc, child=c))
        assert "its render of row 0 differs" in c.failure and c.rows == 0
    assert got == want


def test_the_child_loads_the_tokenizer_class_directly_without_torch(tiny_model_dir, tok):
    code = ("import sys\n"
            "from eagle3_target.data.tokenizer import load_tokenizer, tokenizer_fingerprint\n"
            f"t = load_tokenizer({str(tiny_model_dir)!r}, {tokenizer_class_name(tok)!r})\n"
            "print(tokenizer_fingerprint(t), 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [tokenizer_fingerprint(tok), "False"]


def test_a_child_that_cannot_start_is_never_used(tiny_model_dir, tok, tmp_path):
    with RenderProcess(str(tmp_path / "no-such-tokenizer"), tokenizer_fingerprint(tok)) as c:
        assert not c.wait_ready(120)
        assert c.failure and "no-such-tokenizer" in c.failure
        assert c._proc.poll() is not None  # reaped, not left running
    with RenderProcess(str(tiny_model_dir), "0" * 64) as c:  # another tokenizer than ours
        assert not c.wait_ready(120)
        assert "fingerprint" in c.failure
        with pytest.raises(RuntimeError, match="not ready"):
            next(c.samples(RenderJob.of([sample_data_path()], ChatEncoder(tok), 0, 1, 0)))
    # ... and the stream falls back to rendering here.
    enc = ChatEncoder(tok, max_length=64)
    with RenderProcess(str(tiny_model_dir), "0" * 64) as c:
        c.wait_ready(120)
        got = list(iter_samples_handover([sample_data_path()], enc, child=c))
    assert got == list(iter_samples([sample_data_path()], enc)) and c.rows == 0


def test_a_child_failing_mid_job_is_an_error_that_names_it(child, tok, tmp_path):
    enc = ChatEncoder(tok)
    with pytest.raises(RuntimeError, match="render process failed after row -1: .*does not exist"):
        list(child.samples(RenderJob.of([tmp_path / "gone.jsonl"], enc, 0, 1, 0)))


def test_a_child_killed_mid_job_is_an_error(child, tok, tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_text(sample_data_path().read_text() * 20)  # far more than a pipe holds
    it = child.samples(RenderJob.of([big], ChatEncoder(tok), 0, 1, 0))
    assert isinstance(next(it), Sample)
    os.kill(child._proc.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="exited after row .* without finishing"):
        for _ in it:
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_child_dies_with_its_parent(tiny_model_dir, tok, tmp_path):
    script = (
        "import sys, time\n"
        "from eagle3_target.dump.render import RenderProcess\n"
        f"c = RenderProcess({str(tiny_model_dir)!r}, {tokenizer_fingerprint(tok)!r})\n"
        "print(c._proc.pid, c.wait_ready(120), flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid, ready = parent.stdout.readline().split()
        assert ready == "True"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(int(pid)):
            time.sleep(0.1)
        assert not _alive(int(pid))
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def test_a_dump_rendered_by_the_child_is_byte_identical(tmp_path, tiny_target, tok, tiny_model_dir):
    data = first_sample_chats(tmp_path, 300)
    big = tmp_path / "twice.jsonl"
    big.write_text(data.read_text() * 2)

    def run(render: str, out: Path):
        cfg = DumpConfig(out=str(out), data=[str(big)], mode="hidden", shard_size_mb=0.5, render=render)
        return run_dump(cfg, source=tiny_target, tokenizer=tok, log=lambda s: None)

    a = run("thread", tmp_path / "thread")
    b = run("process", tmp_path / "process")
    assert a.run_child_rows == 0
    assert b.run_child_rows > 0, "the child never took over: the test shows nothing"
    assert files_of(tmp_path / "thread") == files_of(tmp_path / "process")
    assert "rows rendered by a child process" in "\n".join(b.lines())
    assert b.run_load_seconds == 0 and "after loading the target" not in "\n".join(b.lines())  # none loaded


def test_render_settings_are_checked(tmp_path, tiny_target, tok):
    with pytest.raises(ValueError, match="render must be one of auto, thread, process"):
        DumpConfig(out=str(tmp_path / "x"), render="fork")
    assert not DumpConfig(out=str(tmp_path / "x")).render_in_child(engine_on_gpu=False)
    assert DumpConfig(out=str(tmp_path / "x")).render_in_child(engine_on_gpu=True)
    assert not DumpConfig(out=str(tmp_path / "x"), render="thread").render_in_child(engine_on_gpu=True)

    class NoPath:  # a tokenizer object with no folder the child could load
        def __getattr__(self, name):
            if name == "name_or_path":
                return "not/a/folder"
            return getattr(tok, name)

    cfg = DumpConfig(out=str(tmp_path / "d"), render="process")
    with pytest.raises(ValueError, match="--render process needs the tokenizer's folder"):
        run_dump(cfg, source=tiny_target, tokenizer=NoPath(), log=lambda s: None)
    assert not (tmp_path / "d").exists()
