"""``export --to nemo``, checked with NeMo Automodel's own code: ``CachedEagle3Dataset``
over our export against NeMo's in-process reference (``HFEagle3TargetModel`` +
``compute_supervision``) on the same tiny model, chats and draft vocabulary, then one
``Eagle3TrainerModule`` step on a batch from NeMo's cached dataloader."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from batches import draft_vocab_file, first_sample_chats
from eagle3_target.dump import DumpConfig, run_dump
from eagle3_target.dump.reader import Eagle3Dataset
from eagle3_target.export import export
from eagle3_target.export.files import verify_export
from eagle3_target.vocab import VocabMapping

pytest.importorskip("nemo_automodel.components.datasets.llm.eagle3_cache")
N = 9
SEQ = 160


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return first_sample_chats(tmp_path_factory.mktemp("data"), N)


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory, tiny_target, tok, data_file):
    return draft_vocab_file(tmp_path_factory.mktemp("vocab"), tok, data_file, tiny_target.vocab_size,
                            [tok.eos_token_id, tok.pad_token_id], size=1200)


def _dump(out, target, tok, data, **kw):
    run_dump(DumpConfig(out=str(out), data=[str(data)], batch_tokens=400, max_length=SEQ, **kw), source=target,
             tokenizer=tok, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def dumps(tmp_path_factory, tiny_target, tok, data_file, vocab_file) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dumps")
    return {"draft": _dump(root / "draft", tiny_target, tok, data_file, mode="draft", vocab=str(vocab_file)),
            "logits": _dump(root / "logits", tiny_target, tok, data_file, mode="logits"),
            "hidden": _dump(root / "hidden", tiny_target, tok, data_file, mode="hidden")}


@pytest.fixture(scope="module")
def nemo_reference(tiny_target, tok, dumps, vocab_file):
    """NeMo's own supervision for each of our samples, padded as its dataloader pads."""
    from nemo_automodel.components.speculative.eagle.remote.server import compute_supervision
    from nemo_automodel.components.speculative.eagle.target import HFEagle3TargetModel

    wrapper = HFEagle3TargetModel(tiny_target.model, aux_layer_ids=tiny_target.aux_layer_ids)
    mapping = VocabMapping.load(vocab_file)
    ours = Eagle3Dataset(dumps["draft"])
    refs = []
    for i in range(len(ours)):
        raw = ours.raw(i)
        n = raw["input_ids"].shape[0]
        ids = torch.full((1, SEQ), tok.pad_token_id, dtype=torch.int64)
        ids[0, :n] = raw["input_ids"]
        attn = torch.zeros((1, SEQ), dtype=torch.int64)
        attn[0, :n] = 1
        lm = torch.zeros((1, SEQ), dtype=torch.int64)
        lm[0, :n] = raw["loss_mask"].to(torch.int64)
        sup = compute_supervision(wrapper, mapping.selected_token_ids, mapping.selected_token_mask, ids, attn, lm)
        refs.append(({k: v[0] for k, v in sup.items()}, attn[0], n))
    return refs


@pytest.fixture(scope="module")
def exports(tmp_path_factory, dumps, vocab_file, tiny_path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nemo")
    out = {}
    for mode, d in dumps.items():
        out[mode] = root / mode
        export("nemo", str(d), str(out[mode]), vocab=str(vocab_file), model=tiny_path, shard_size=4)
    return out


@pytest.mark.parametrize("mode", ["draft", "logits", "hidden"])
def test_cached_dataset_equals_nemos_own_reference(exports, nemo_reference, mode):
    from nemo_automodel.components.datasets.llm.eagle3_cache import CachedEagle3Dataset

    ds = CachedEagle3Dataset(str(exports[mode]))
    assert len(ds) == N and ds.shard_size == 4
    supervised = 0
    for (ref, attn, n), i in zip(nemo_reference, range(N)):
        got = ds[i]
        assert set(got) == {"input_ids", "attention_mask", "loss_mask", "aux_hidden_states", "position_mask",
                            "target_probs"}
        assert got["input_ids"].dtype == torch.int64 and torch.equal(got["input_ids"], ref["input_ids"])
        assert torch.equal(got["attention_mask"], attn)
        assert torch.equal(got["loss_mask"], ref["loss_mask"].to(torch.int64))
        assert torch.equal(got["position_mask"], ref["position_mask"])
        assert got["position_mask"].shape == (SEQ, 1)
        supervised += int(got["position_mask"].sum())
        # Real tokens: every value; pads (aux) and positions from the last real token on
        # (probs) hold what no loss reads and are documented to differ.
        torch.testing.assert_close(got["aux_hidden_states"][:n], ref["aux_hidden_states"][:n], atol=1e-5, rtol=0)
        assert not got["aux_hidden_states"][n:].any()
        torch.testing.assert_close(got["target_probs"][:n - 1], ref["target_probs"][:n - 1], atol=1e-5, rtol=0)
    assert supervised > 20  # the comparison covers supervised positions, not only masked ones


def test_manifest_embeddings_and_options_pass_nemos_checks(exports, tiny_target, vocab_file):
    from nemo_automodel.components.datasets.llm.eagle3_cache import read_manifest, read_target_embeddings
    from nemo_automodel.components.datasets.llm.offline_cache import ensure_supervision_options_match

    m = read_manifest(str(exports["draft"]))
    assert m["format_version"] == 2 and m["num_samples"] == N and m["seq_length"] == SEQ
    assert m["selected_token_ids"] == VocabMapping.load(vocab_file).selected_token_ids.tolist()
    assert m["target_vocab_size"] == tiny_target.vocab_size and m["aux_hidden_dim"] == 3 * tiny_target.hidden_size
    ensure_supervision_options_match(m, {"mask_reasoning_content": False, "mask_generation_prompt": False},
                                     cache_name="EAGLE-3", cache_dir="x", producer_name="eagle3-target")
    emb = read_target_embeddings(str(exports["draft"]))
    assert emb.dtype == torch.float32 and torch.equal(emb, tiny_target.model.get_input_embeddings().weight)
    assert verify_export(exports["draft"]).ok


def test_one_trainer_step_on_a_cached_batch_gives_a_finite_loss(exports, tiny_target, vocab_file):
    from nemo_automodel.components.datasets.llm.eagle3_cache import (
        build_cached_eagle3_dataloader, read_manifest, read_target_embeddings)
    from nemo_automodel.components.speculative.eagle.core import Eagle3TrainerModule
    from nemo_automodel.components.speculative.eagle.draft_llama import LlamaEagle3DraftModel
    from types import SimpleNamespace

    path = str(exports["logits"])
    m = read_manifest(path)
    ids = torch.tensor(m["selected_token_ids"], dtype=torch.long)
    mask = torch.zeros(m["target_vocab_size"], dtype=torch.bool)
    mask[ids] = True
    cfg = copy.deepcopy(tiny_target.model.config)
    d = cfg.to_dict()  # what the recipe does with the target's config
    d.update(num_hidden_layers=1, draft_vocab_size=int(ids.numel()), target_hidden_size=cfg.hidden_size,
             tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    draft = LlamaEagle3DraftModel(type(cfg).from_dict(d)).to(torch.float32)
    draft.copy_embeddings_from_target(SimpleNamespace(weight=read_target_embeddings(path)))
    draft.set_vocab_mapping(ids)
    trainer = Eagle3TrainerModule(draft, selected_token_ids=ids, selected_token_mask=mask, ttt_steps=3)
    batch = next(iter(build_cached_eagle3_dataloader(cache_dir=path, batch_size=3, shuffle=False)))
    assert batch["aux_hidden_states"].shape == (3, SEQ, 3 * cfg.hidden_size)
    metrics = trainer(**batch)
    loss = float(metrics.loss.detach())
    assert math.isfinite(loss) and loss > 0
    metrics.loss.backward()
    grads = [p.grad for p in draft.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_errors_name_the_flags_and_write_nothing(tmp_path, dumps, vocab_file, tiny_path):
    with pytest.raises(ValueError, match="needs the draft vocabulary: pass --vocab"):
        export("nemo", str(dumps["hidden"]), str(tmp_path / "a"), vocab=None, model=tiny_path)
    with pytest.raises(ValueError, match="needs --model DIR"):
        export("nemo", str(dumps["hidden"]), str(tmp_path / "a"), vocab=str(vocab_file), model=None)
    with pytest.raises(ValueError, match="--seq-length 20 is shorter than the longest sample"):
        export("nemo", str(dumps["hidden"]), str(tmp_path / "a"), vocab=str(vocab_file), model=tiny_path,
               seq_length=20)
    assert not (tmp_path / "a").exists()


def test_a_vocab_other_than_the_dumps_is_refused(tmp_path, dumps, tok, data_file, tiny_target, tiny_path):
    other = draft_vocab_file(tmp_path, tok, data_file, tiny_target.vocab_size, [tok.eos_token_id], size=150)
    with pytest.raises(ValueError, match="is not the draft vocabulary the dump used"):
        export("nemo", str(dumps["draft"]), str(tmp_path / "a"), vocab=str(other), model=tiny_path)


def test_rerun_is_byte_identical_and_repairs_a_corrupted_shard(tmp_path, dumps, exports, vocab_file, tiny_path):
    out = tmp_path / "out"
    export("nemo", str(dumps["hidden"]), str(out), vocab=str(vocab_file), model=tiny_path, shard_size=4)
    tree = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".")}
    assert tree(out) == tree(exports["hidden"])
    victim = out / "shard-000001.safetensors"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x55
    victim.write_bytes(bytes(data))
    assert any("shard-000001" in p for p in verify_export(out).problems)
    s = export("nemo", str(dumps["hidden"]), str(out), vocab=str(vocab_file), model=tiny_path, shard_size=4)
    assert s.rewritten == ["shard-000001.safetensors"] and s.run_files == 1
    assert tree(out) == tree(exports["hidden"]) and verify_export(out).ok


def test_our_reader_reads_the_cache_back_as_our_samples(exports, dumps):
    from eagle3_target.export import TrainerDataset

    ours, back = Eagle3Dataset(dumps["draft"]), TrainerDataset(exports["draft"])
    assert back.format == "nemo" and len(back) == len(ours)
    for i in range(N):
        a, b = ours[i], back[i]
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert TrainerDataset(dumps["draft"]).format == "dump"


def test_kill9_then_rerun_is_byte_identical(tmp_path, dumps, exports, vocab_file, tiny_path):
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "import sys; from eagle3_target.cli import main; sys.exit(main(sys.argv[1:]))",
           "export", str(dumps["hidden"]), "--to", "nemo", "--out", str(out), "--vocab", str(vocab_file),
           "--model", tiny_path, "--shard-size", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "EAGLE3_TARGET_DUMP_KILL_AT": "export_file_renamed:2"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (out / "manifest.json").exists()  # NeMo's reader cannot open it half-written
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    tree = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".")}
    assert tree(out) == tree(exports["hidden"])
