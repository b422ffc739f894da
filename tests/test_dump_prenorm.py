"""``final_prenorm``: the final state before the final norm, through the contract and the
dump (``--with-prenorm``), stored unshifted; refused where the target cannot give it."""

from __future__ import annotations

import pytest
import torch

from batches import first_sample_chats
from eagle3_target.dump import DumpConfig, run_dump
from eagle3_target.dump.format import read_manifest
from eagle3_target.dump.reader import Eagle3Dataset
from eagle3_target.dump.verify import verify_dump


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return first_sample_chats(tmp_path_factory.mktemp("data"), 6)


def _dump(out, target, tok, data, **kw):
    cfg = DumpConfig(out=str(out), data=[str(data)], **kw)
    return run_dump(cfg, source=target, tokenizer=tok, log=lambda s: None)


def test_generate_prenorm_is_the_stream_the_final_norm_takes(tiny_target):
    ids = torch.tensor([[5, 9, 77, 3]])
    ones = torch.ones_like(ids)
    aux, pre = tiny_target.generate_prenorm(ids, ones, ones)
    model = tiny_target.model
    ref = model(input_ids=ids, output_hidden_states=True)
    # transformers' last hidden state is normed: the norm of ours is exactly it
    torch.testing.assert_close(model.model.norm(pre), ref.hidden_states[-1], atol=1e-6, rtol=0)
    assert not torch.allclose(pre, ref.hidden_states[-1], atol=1e-3)
    torch.testing.assert_close(aux, tiny_target.generate_batch(ids, ones, ones).aux_hidden_states)


@pytest.mark.parametrize("mode", ["hidden", "logits"])
def test_dump_with_prenorm_stores_each_samples_prenorm_unshifted(tmp_path, tiny_target, tok, data_file, mode):
    _dump(tmp_path / "d", tiny_target, tok, data_file, mode=mode, with_prenorm=True, batch_tokens=300)
    assert read_manifest(tmp_path / "d" / "manifest.json")["config"]["with_prenorm"] is True
    assert verify_dump(tmp_path / "d").ok
    ds = Eagle3Dataset(tmp_path / "d")
    assert len(ds) == 6
    for i in range(len(ds)):
        s = ds.raw(i)
        ids = s["input_ids"][None]
        ones = torch.ones_like(ids)
        _, want = tiny_target.generate_prenorm(ids, ones, ones)
        assert s["final_prenorm"].shape == (ids.shape[1], tiny_target.hidden_size)
        torch.testing.assert_close(s["final_prenorm"], want[0], atol=1e-5, rtol=0)
        if mode == "hidden":  # the stored post-norm state is the norm of the stored pre-norm one, shifted
            normed = tiny_target.model.model.norm(s["final_prenorm"])
            torch.testing.assert_close(s["hidden_states"][:-1], normed[1:], atol=1e-5, rtol=0)


def test_default_dump_records_no_prenorm(tmp_path, tiny_target, tok, data_file):
    _dump(tmp_path / "d", tiny_target, tok, data_file, mode="hidden")
    cfg = read_manifest(tmp_path / "d" / "manifest.json")["config"]
    assert "with_prenorm" not in cfg
    assert "final_prenorm" not in Eagle3Dataset(tmp_path / "d").raw(0)


class _NoPrenorm:
    """A target source that, like a remote server, gives no pre-norm state."""

    def __init__(self, target):
        self._t = target
        self.aux_layer_ids = target.aux_layer_ids
        self.hidden_size, self.vocab_size, self.model = target.hidden_size, target.vocab_size, target.model

    def generate_hidden(self, *a):
        return self._t.generate_hidden(*a)

    def generate_batch(self, *a):
        return self._t.generate_batch(*a)

    def lm_head(self):
        return self._t.lm_head()

    def close(self):
        pass


class _RefusingRunner:
    def __init__(self, runner):
        self._r, self.model = runner, runner.model

    def set_aux_layers(self, ids):
        self._r.set_aux_layers(ids)

    def forward_eagle3(self, *a):
        return self._r.forward_eagle3(*a)

    def forward_eagle3_prenorm(self, *a):  # what the SGLang engine does without model.norm
        raise NotImplementedError("FooForCausalLM has no final norm module at model.norm: prenorm mode is "
                                  "unavailable; use engine='hf'")

    def input_embedding_weight(self):
        return self._r.input_embedding_weight()

    def close(self):
        pass


def test_a_target_without_prenorm_is_refused_before_anything_is_written(tmp_path, tiny_target, tok, data_file):
    from eagle3_target import Eagle3TargetModel

    with pytest.raises(ValueError, match="--with-prenorm: .*run the dump in process with --model"):
        _dump(tmp_path / "a", _NoPrenorm(tiny_target), tok, data_file, mode="hidden", with_prenorm=True)
    assert not (tmp_path / "a").exists()
    refusing = Eagle3TargetModel(_RefusingRunner(tiny_target.runner))
    with pytest.raises(ValueError, match="--with-prenorm: .*no final norm module"):
        _dump(tmp_path / "b", refusing, tok, data_file, mode="logits", with_prenorm=True)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("release", ["0.5.16", "0.5.23"])
def test_sglang_engine_dump_with_prenorm_equals_the_hf_engines(monkeypatch, tmp_path, tiny_path, tiny_target, tok,
                                                               data_file, release):
    """Through the SGLang engine (its fakes, on CPU): the pre-norm state read off the final
    norm's inputs, stored by the dump, equals the HF engine's hook on the last layer."""
    from eagle3_target import Eagle3TargetModel
    from sglang_helpers import TOL, use_fake

    use_fake(monkeypatch, release)
    with Eagle3TargetModel.from_pretrained(tiny_path, engine="sglang", dtype="float32") as t:
        _dump(tmp_path / "d", t, tok, data_file, mode="hidden", with_prenorm=True, batch_tokens=300)
    ds = Eagle3Dataset(tmp_path / "d")
    for i in range(len(ds)):
        s = ds.raw(i)
        ids = s["input_ids"][None]
        _, want = tiny_target.generate_prenorm(ids, torch.ones_like(ids), torch.ones_like(ids))
        torch.testing.assert_close(s["final_prenorm"], want[0], **TOL)
