"""Damaged manifests and structurally broken shards: what a trainer reads must be what
was computed, or an error. Each case is met by ``verify`` (fails, naming the file), the
reader (refuses on open, naming the file) and a rerun of the same dump (repairs it to
the bytes of an undamaged dump: re-adopting an intact unlisted shard, or computing the
missing rows again)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batches import files_of, first_sample_chats
from eagle3_target.dump import DumpConfig, run_dump
from eagle3_target.dump.format import read_header_meta, read_manifest, sha256_file
from eagle3_target.dump.reader import Eagle3Dataset
from eagle3_target.dump.summary import summary_json
from eagle3_target.dump.verify import verify_dump

N_ROWS = 40


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return first_sample_chats(tmp_path_factory.mktemp("data"), N_ROWS)


def dump(out: Path, target, tok, data: Path, logs: list[str] | None = None, **kw):
    cfg = DumpConfig(out=str(out), data=[str(data)], batch_tokens=1024, shard_size_mb=0.05, **kw)
    return run_dump(cfg, source=target, tokenizer=tok, log=(logs.append if logs is not None else lambda s: None))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_target, tok, data_file) -> Path:
    out = tmp_path_factory.mktemp("ref") / "d"
    s = dump(out, tiny_target, tok, data_file)
    assert s.complete and s.samples == N_ROWS and s.shards >= 6
    assert verify_dump(out).ok
    return out


@pytest.fixture
def copy(tmp_path, reference) -> Path:
    out = tmp_path / "d"
    shutil.copytree(reference, out)
    return out


def edit_manifest(d: Path, change) -> dict:
    p = d / "manifest.json"
    m = json.loads(p.read_text())
    change(m)
    p.write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    return m


def assert_all_refuse(d: Path, needle: str) -> None:
    """verify fails, the reader refuses to open, and both name ``needle``."""
    report = verify_dump(d)
    assert not report.ok
    assert any(needle in p for p in report.problems), report.problems
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        Eagle3Dataset(d)


def assert_rerun_repairs(d: Path, reference: Path, target, tok, data: Path, *, adopted: int = 0,
                         repaired: int = 0) -> list[str]:
    logs: list[str] = []
    s = dump(d, target, tok, data, logs)
    assert s.complete and s.samples == N_ROWS
    assert (s.shards_adopted, s.shards_repaired, s.shards_written) == (adopted, repaired, 0), logs
    assert files_of(d) == files_of(reference)
    assert verify_dump(d).ok
    assert len(Eagle3Dataset(d)) == N_ROWS
    return logs


# --------------------------------------------------------------------------- the manifest


def test_last_entry_deleted_is_an_error_and_the_rerun_re_adopts_the_file(copy, reference, tiny_target, tok,
                                                                         data_file):
    m = edit_manifest(copy, lambda m: m["shards"].pop())
    last = f"shard-{len(m['shards']):05d}.safetensors"
    assert (copy / last).is_file()
    assert_all_refuse(copy, last)
    assert_rerun_repairs(copy, reference, tiny_target, tok, data_file, adopted=1)


def test_middle_entry_deleted_is_an_error_and_the_rerun_re_adopts_the_file(copy, reference, tiny_target, tok,
                                                                           data_file):
    edit_manifest(copy, lambda m: m["shards"].pop(2))
    assert_all_refuse(copy, "shard-00002.safetensors")
    assert_rerun_repairs(copy, reference, tiny_target, tok, data_file, adopted=1)


def test_middle_entry_and_its_file_deleted_the_rerun_computes_the_rows_again(copy, reference, tiny_target, tok,
                                                                              data_file):
    edit_manifest(copy, lambda m: m["shards"].pop(2))
    (copy / "shard-00002.safetensors").unlink()
    assert_all_refuse(copy, "manifest.json")
    logs = assert_rerun_repairs(copy, reference, tiny_target, tok, data_file, repaired=1)
    assert any("computing them again" in line for line in logs), logs


def test_last_entries_and_files_deleted_the_rerun_computes_them_again(copy, reference, tiny_target, tok,
                                                                      data_file):
    m = edit_manifest(copy, lambda m: m["shards"].__delitem__(slice(-2, None)))
    for j in (len(m["shards"]), len(m["shards"]) + 1):
        (copy / f"shard-{j:05d}.safetensors").unlink()
    assert_all_refuse(copy, "shards are missing from the manifest")
    assert_rerun_repairs(copy, reference, tiny_target, tok, data_file, repaired=2)


def test_an_unlisted_file_that_is_not_ours_is_removed_with_a_note(copy, reference, tiny_target, tok, data_file):
    n = len(read_manifest(copy / "manifest.json")["shards"])
    shutil.copy(copy / "shard-00000.safetensors", copy / f"shard-{n:05d}.safetensors")
    assert_all_refuse(copy, f"shard-{n:05d}.safetensors")
    logs = assert_rerun_repairs(copy, reference, tiny_target, tok, data_file)
    assert any(f"removed shard-{n:05d}.safetensors" in line for line in logs), logs


def test_a_gap_in_the_row_ranges_is_an_error(copy):
    def shift(m):
        m["shards"][3]["rows"][0] += 1

    edit_manifest(copy, shift)
    assert_all_refuse(copy, "samples are unaccounted for")


def test_counts_that_disagree_are_errors_and_the_rerun_restores_them(copy, reference, tiny_target, tok, data_file):
    def change(m):
        m["summary"]["samples"] -= 4
        m["shards"][1]["tokens"] += 7

    edit_manifest(copy, change)
    report = verify_dump(copy)
    assert not report.ok
    assert any("summary disagrees" in p for p in report.problems), report.problems
    assert any(p.startswith("shard-00001.safetensors:") for p in report.problems), report.problems
    with pytest.raises(ValueError, match="manifest.json: its summary disagrees"):
        Eagle3Dataset(copy)
    logs = assert_rerun_repairs(copy, reference, tiny_target, tok, data_file)
    assert any("restored the entry from the header" in line for line in logs), logs


def test_sample_count_edited_in_an_entry_is_caught_by_the_reader(copy):
    def change(m):  # the manifest stays consistent in itself; shard 0's file disagrees
        m["shards"][0]["num_samples"] -= 1
        for e in m["shards"][1:]:
            e["first_sample"] -= 1
        m["summary"]["samples"] -= 1

    edit_manifest(copy, change)
    assert_all_refuse(copy, "shard-00000.safetensors")


def test_a_manifest_that_nothing_on_disk_can_correct_is_refused_and_nothing_changes(copy, tiny_target, tok,
                                                                                   data_file):
    def change(m):
        m["shards"][2]["file"] = "../elsewhere.safetensors"

    edit_manifest(copy, change)
    before = files_of(copy)
    with pytest.raises(ValueError, match="cannot be repaired from what is on disk"):
        dump(copy, tiny_target, tok, data_file)
    assert files_of(copy) == before


# --------------------------------------------------------------------------- shard structure


def rewrite_shard(d: Path, name: str, change) -> None:
    """Rewrites a shard's tensors with ``change(tensors)`` and records its new hash and
    size in the manifest, so only its structure is wrong (not its checksum)."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(d / name), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    (d / name).write_bytes(save(tensors, metadata=meta))

    def record(m):
        e = next(e for e in m["shards"] if e["file"] == name)
        e["sha256"], e["bytes"] = sha256_file(d / name), (d / name).stat().st_size
        m["summary"] = summary_json(m)

    edit_manifest(d, record)


def test_duplicated_row_index_is_refused_on_open_naming_the_file(copy):
    def dup(t):
        t["row_index"][1] = t["row_index"][0]

    rewrite_shard(copy, "shard-00001.safetensors", dup)
    assert_all_refuse(copy, "shard-00001.safetensors")
    with pytest.raises(ValueError, match="row_index not strictly increasing"):
        Eagle3Dataset(copy)


def test_offsets_that_fall_or_disagree_with_the_tensors_are_refused(copy, reference):
    def fall(t):
        t["offsets"][2], t["offsets"][3] = t["offsets"][3].clone(), t["offsets"][2].clone()

    rewrite_shard(copy, "shard-00002.safetensors", fall)
    with pytest.raises(ValueError, match=r"shard-00002\.safetensors: offsets do not split"):
        Eagle3Dataset(copy)
    shutil.copy(reference / "shard-00002.safetensors", copy / "shard-00002.safetensors")
    shutil.copy(reference / "manifest.json", copy / "manifest.json")

    def shorter(t):  # one token fewer in every per-token tensor, the offsets unchanged
        for k in list(t):
            if k not in ("offsets", "row_index"):
                t[k] = t[k][:-1].clone()

    rewrite_shard(copy, "shard-00003.safetensors", shorter)
    with pytest.raises(ValueError, match=r"shard-00003\.safetensors: .*input_ids is \(\d+,\)"):
        Eagle3Dataset(copy)


def test_a_missing_or_unreadable_shard_is_named_by_the_reader(copy):
    (copy / "shard-00001.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors: unreadable"):
        Eagle3Dataset(copy)
    (copy / "shard-00001.safetensors").unlink()
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors: missing"):
        Eagle3Dataset(copy)


def test_the_header_entry_of_every_shard_matches_its_manifest_entry(reference):
    from safetensors import safe_open

    for e in read_manifest(reference / "manifest.json")["shards"]:
        with safe_open(str(reference / e["file"]), framework="pt") as f:
            head = read_header_meta(f)["entry"]
        assert head == {k: v for k, v in e.items() if k not in ("file", "bytes", "sha256")}


def test_verify_help_says_no_hash_checks_structure_only():
    r = subprocess.run([sys.executable, "-m", "eagle3_target.cli", "verify", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "--no-hash" in text and "structure and counts only" in text and "flipped bit" in text


@pytest.mark.slow
def test_the_command_line_on_the_issue_case_verify_fails_and_a_rerun_restores(copy, reference, data_file):
    """The real commands: the last entry deleted (its file kept) makes `verify` exit 1
    naming the file, and rerunning `dump` exits 0 with the entry restored."""
    m = edit_manifest(copy, lambda m: m["shards"].pop())
    last = f"shard-{len(m['shards']):05d}.safetensors"
    cli = [sys.executable, "-m", "eagle3_target.cli"]
    v = subprocess.run(cli + ["verify", str(copy)], capture_output=True, text=True, timeout=120)
    assert v.returncode == 1 and f"{last}: a shard file that manifest.json does not list" in v.stdout, v.stdout
    r = subprocess.run(cli + ["dump", "--data", str(data_file), "--out", str(copy), "--device", "cpu",
                              "--batch-tokens", "1024", "--shard-size-mb", "0.05", "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "adopted 1, repaired 0" in r.stdout and "shards written 0" in r.stdout, r.stdout
    assert files_of(copy) == files_of(reference)
    v = subprocess.run(cli + ["verify", str(copy)], capture_output=True, text=True, timeout=120)
    assert v.returncode == 0 and "OK:" in v.stdout, v.stdout


def test_a_complete_manifest_without_its_tail_is_refused_and_nothing_changes(copy, tiny_target, tok, data_file):
    edit_manifest(copy, lambda m: m.__setitem__("tail", None))
    assert_all_refuse(copy, "manifest.json")
    before = files_of(copy)
    with pytest.raises(ValueError, match="says nothing of the rows after its last sample"):
        dump(copy, tiny_target, tok, data_file)
    assert files_of(copy) == before


def test_a_split_dump_accounts_per_worker_and_a_worker_rerun_repairs_its_own(tmp_path, tiny_target, tok, data_file):
    ref, out = tmp_path / "ref", tmp_path / "d"
    for i in (0, 1):
        dump(ref, tiny_target, tok, data_file, num_shards=2, shard_index=i)
    shutil.copytree(ref, out)
    name = "manifest-00001-of-00002.json"
    m = json.loads((out / name).read_text())
    lost = m["shards"].pop(1)["file"]
    (out / name).write_text(json.dumps(m))
    report = verify_dump(out)
    assert not report.ok and any(p.startswith(f"{lost}: a shard file that {name} does not list")
                                 for p in report.problems), report.problems
    with pytest.raises(ValueError, match=lost):
        Eagle3Dataset(out)
    s = dump(out, tiny_target, tok, data_file, num_shards=2, shard_index=1)
    assert s.shards_adopted == 1 and s.shards_written == 0
    assert files_of(out) == files_of(ref)
    assert len(Eagle3Dataset(out)) == N_ROWS


def test_an_unfinished_dump_read_with_allow_incomplete_serves_its_listed_shards(copy):
    def unfinish(m):
        m["complete"], m["tail"], m["summary"] = False, None, None
        m["shards"].pop()  # the writer's next shard: on disk, not yet listed

    m = edit_manifest(copy, unfinish)
    ds = Eagle3Dataset(copy, allow_incomplete=True)
    assert len(ds) == sum(e["num_samples"] for e in m["shards"])

    def gap(m):
        m["shards"].pop(1)

    edit_manifest(copy, gap)
    with pytest.raises(ValueError, match="an entry is missing or out of order"):
        Eagle3Dataset(copy, allow_incomplete=True)
