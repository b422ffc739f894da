"""``export --to speculators``, checked with speculators' own reader (``ArrowDataset``
over ``hs_connectors.FileTransfer``) and its trainer's target computation
(``verifier_lm_head(verifier_norm(final))`` after ``shift_batch``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batches import draft_vocab_file, first_sample_chats
from eagle3_target.dump.format import folder_lock
from eagle3_target.cli import main as cli_main
from eagle3_target.dump import DumpConfig, run_dump
from eagle3_target.dump.reader import Eagle3Dataset
from eagle3_target.export import export
from eagle3_target.export.files import SIDECAR, verify_export

pytest.importorskip("speculators.train.data")
N = 10


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return first_sample_chats(tmp_path_factory.mktemp("data"), N)


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory, tiny_target, tok, data_file):
    return draft_vocab_file(tmp_path_factory.mktemp("vocab"), tok, data_file, tiny_target.vocab_size,
                            [tok.eos_token_id, tok.pad_token_id])


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory, tiny_target, tok, data_file) -> Path:
    d = tmp_path_factory.mktemp("dump") / "d"
    run_dump(DumpConfig(out=str(d), data=[str(data_file)], mode="logits", with_prenorm=True, batch_tokens=400,
                        shard_size_mb=0.5), source=tiny_target, tokenizer=tok, log=lambda s: None)
    return d


@pytest.fixture(scope="module")
def exported(tmp_path_factory, dump_dir, vocab_file) -> Path:
    out = tmp_path_factory.mktemp("spec") / "out"
    export("speculators", str(dump_dir), str(out), vocab=str(vocab_file))
    return out


def tree(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` by relative path (the lock and temporary files left out)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def _arrow(out: Path, split: str = "train", train_ratio: float = 1.0):
    from hs_connectors import FileTransfer
    from speculators.train.data import ArrowDataset

    return ArrowDataset(max_len=4096, datapath=str(out), transfer=FileTransfer(out / "hidden_states"),
                        on_missing="raise", hidden_states_dtype=torch.float32, split=split,
                        train_ratio=train_ratio)


def test_arrow_dataset_yields_our_tokens_masks_aux_and_prenorm(exported, dump_dir):
    ours = Eagle3Dataset(dump_dir)
    theirs = _arrow(exported)
    assert len(theirs) == len(ours) == N
    assert theirs.approx_lengths == [ours.raw(i)["input_ids"].shape[0] for i in range(N)]
    for i in range(N):
        raw, got = ours.raw(i), theirs[i]
        assert torch.equal(got["input_ids"], raw["input_ids"])
        assert torch.equal(got["loss_mask"], raw["loss_mask"].to(torch.int64))
        assert torch.equal(got["hidden_states"], raw["aux_hidden_states"])  # [S,3H], our aux order
        assert torch.equal(got["verifier_last_hidden_states"], raw["final_prenorm"])
        assert torch.equal(got["position_ids"], torch.arange(raw["input_ids"].shape[0]))


def test_its_trainer_targets_equal_our_logits(exported, dump_dir, tiny_target, vocab_file):
    from speculators.models.eagle3.data import shift_batch
    from speculators.models.eagle3.model_definitions import model_classes

    from eagle3_target.vocab import VocabMapping

    cfg = tiny_target.model.config
    norm = model_classes["llama"].norm_class(cfg.hidden_size, eps=cfg.rms_norm_eps)
    norm.load_state_dict(tiny_target.model.model.norm.state_dict())
    head = tiny_target.model.lm_head
    mapping = VocabMapping.load(vocab_file)
    import numpy as np

    t2d = torch.from_numpy(np.load(exported / "t2d.npy"))
    d2t = torch.from_numpy(np.load(exported / "d2t.npy"))
    assert torch.equal(t2d, mapping.selected_token_mask)
    draft_ids = torch.arange(d2t.numel()) + d2t  # speculators: target = draft + d2t[draft], in id order
    assert torch.equal(draft_ids, t2d.nonzero().flatten())
    ours, theirs = Eagle3Dataset(dump_dir), _arrow(exported)
    for i in range(N):
        b = shift_batch(theirs[i])
        with torch.no_grad():
            targets = head(norm(b["verifier_last_hidden_states"]))  # what its trainer computes
            draft_targets = torch.nn.functional.linear(norm(b["verifier_last_hidden_states"]), head.weight[t2d])
        logits = ours[i]["logits"]  # shifted, zero tail
        torch.testing.assert_close(targets, logits[:-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(draft_targets, logits[:-1][:, draft_ids], atol=1e-5, rtol=0)
        assert torch.equal(b["loss_mask"], ours[i]["loss_mask"][:-1])  # the same shift as ours


def test_layer_ids_are_recorded_in_both_numberings(exported, dump_dir):
    import json

    side = json.loads((exported / SIDECAR).read_text())
    ids = Eagle3Dataset(dump_dir).aux_layer_ids
    assert side["settings"]["aux_layer_ids"] == ids == [1, 3, 4]
    assert side["settings"]["vllm_layer_ids"] == [2, 4, 5]  # vLLM's default [2, N//2, N-3] for N=8
    assert side["complete"] and verify_export(exported).ok


def test_a_dump_without_prenorm_is_refused_naming_the_flags(tmp_path, tiny_target, tok, data_file):
    d = tmp_path / "plain"
    run_dump(DumpConfig(out=str(d), data=[str(data_file)], mode="hidden"), source=tiny_target, tokenizer=tok,
             log=lambda s: None)
    with pytest.raises(ValueError, match="--with-prenorm, or pass --model DIR"):
        export("speculators", str(d), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_model_recomputes_the_prenorm_a_dump_lacks(tmp_path, tiny_target, tok, data_file, tiny_path, exported,
                                                   dump_dir):
    d = tmp_path / "plain"
    run_dump(DumpConfig(out=str(d), data=[str(data_file)], mode="logits", batch_tokens=400), source=tiny_target,
             tokenizer=tok, log=lambda s: None)
    export("speculators", str(d), str(tmp_path / "out"), model=tiny_path)
    a, b = _arrow(tmp_path / "out"), _arrow(exported)
    for i in range(N):
        torch.testing.assert_close(a[i]["verifier_last_hidden_states"], b[i]["verifier_last_hidden_states"],
                                   atol=1e-5, rtol=0)


def _cli(dump_dir, out, vocab, preexec_fn=None, **env):
    code = ("import sys; from eagle3_target.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, "export", str(dump_dir), "--to", "speculators",
                           "--out", str(out), "--vocab", str(vocab)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300, preexec_fn=preexec_fn)


@pytest.mark.parametrize("point", ["export_file_written:4", "export_file_renamed:7", "export_file_renamed:14"])
def test_kill9_then_rerun_is_byte_identical(tmp_path, dump_dir, vocab_file, exported, point):
    out = tmp_path / "out"
    r = _cli(dump_dir, out, vocab_file, EAGLE3_TARGET_DUMP_KILL_AT=point)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (out / "state.json").exists()  # the trainer cannot open a half-written export
    r = _cli(dump_dir, out, vocab_file)
    assert r.returncode == 0, r.stderr[-2000:]
    assert tree(out) == tree(exported)
    assert not list(out.rglob(".tmp-*"))


def test_a_full_disk_says_which_file_and_what_to_do_and_keeps_no_temporary_file(tmp_path, dump_dir, vocab_file):
    """The export's error is worded as the dump's: the file, why, the fix, what is kept."""
    import resource

    limit = 20_000  # bytes per file: the small files fit, a hidden-state file does not

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    r = _cli(dump_dir, out, vocab_file, preexec_fn=cap)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "File too large" in r.stderr and "free some space" in r.stderr, r.stderr
    assert f"the finished files in {out} are kept; run the same command again" in r.stderr
    assert not list(out.rglob(".tmp-*")), list(out.rglob("*"))


def test_a_corrupted_file_is_caught_and_rewritten(tmp_path, dump_dir, vocab_file, exported, capsys):
    out = tmp_path / "out"
    export("speculators", str(dump_dir), str(out), vocab=str(vocab_file))
    victim = out / "hidden_states" / "hs_3.safetensors"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # same size, one flipped byte: only the sha256 sees it
    victim.write_bytes(bytes(data))
    rep = verify_export(out)
    assert not rep.ok and any("hs_3" in p and "sha256" in p for p in rep.problems)
    assert cli_main(["verify", str(out)]) == 1
    s = export("speculators", str(dump_dir), str(out), vocab=str(vocab_file))
    assert s.rewritten == ["hidden_states/hs_3.safetensors"] and s.run_files == 1
    assert tree(out) == tree(exported)
    assert verify_export(out).ok and cli_main(["verify", str(out)]) == 0


def test_other_settings_over_an_export_are_refused(tmp_path, dump_dir, vocab_file):
    out = tmp_path / "out"
    export("speculators", str(dump_dir), str(out), vocab=str(vocab_file))
    with pytest.raises(ValueError, match="different settings"):
        export("speculators", str(dump_dir), str(out))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        export("speculators", str(dump_dir), str(tmp_path / "busy"))
    locked = tmp_path / "locked"
    locked.mkdir()
    with folder_lock(locked, ".lock", "held by this test"):  # another export's lock
        with pytest.raises(ValueError, match="another export is writing"):
            export("speculators", str(dump_dir), str(locked), vocab=str(vocab_file))
        assert sorted(p.name for p in locked.iterdir()) == [".lock"]


def test_our_reader_reads_the_export_back_as_our_samples(exported, dump_dir):
    from eagle3_target.export import TrainerDataset

    ours, back = Eagle3Dataset(dump_dir), TrainerDataset(exported)
    assert back.format == "speculators" and len(back) == N
    for i in range(N):
        a, b = ours[i], back[i]
        for k in ("input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "final_prenorm"):
            assert torch.equal(a[k], b[k]), k


def test_our_reader_refuses_mismatched_ids_and_unknown_folders(tmp_path, exported):
    import shutil

    from safetensors.torch import load_file, save_file

    from eagle3_target.export import TrainerDataset

    with pytest.raises(ValueError, match="neither a dump, a NeMo offline cache nor a speculators export"):
        TrainerDataset(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    hs = copy / "hidden_states" / "hs_2.safetensors"
    t = load_file(hs)
    t["token_ids"] = t["token_ids"].flip(0)
    save_file(t, hs)
    back = TrainerDataset(copy)
    back[1]
    with pytest.raises(ValueError, match="hs_2.safetensors holds other token ids than row 2"):
        back[2]
