"""The formats against golden files written when they were fixed (tests/golden.py says
how they are made): every byte our current writers produce must match."""

from __future__ import annotations

import pytest
import torch

import golden
from batches import files_of


def test_dump_of_the_sample_chats_matches_the_golden_v1_dump(tmp_path):
    out = golden.write_dump(tmp_path / "dump")
    want = files_of(golden.DUMP_DIR)
    got = files_of(out)
    assert sorted(got) == sorted(want)
    for name in want:  # manifest (every shard's sha256 in it), shards, LM head
        assert got[name] == want[name], f"{name} differs from the golden file"


def test_nmet_blob_matches_the_golden_file():
    from eagle3_target.wire import nmet

    blob = golden.NMET_FILE.read_bytes()
    assert nmet.encode(golden.nmet_tensors()) == blob
    decoded = nmet.decode(blob)
    assert list(decoded) == list(golden.nmet_tensors())
    for k, v in golden.nmet_tensors().items():
        if v is None:
            assert decoded[k] is None
        else:
            assert decoded[k].dtype == v.dtype and torch.equal(decoded[k], v)


@pytest.mark.parametrize("mode", sorted(golden.V1_BODIES))
def test_v1_supervision_body_matches_the_golden_file(mode):
    assert golden.supervision_body(mode) == golden.V1_BODIES[mode].read_bytes()
