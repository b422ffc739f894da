"""A tensor-parallel target behind one real server process: ``eagle3-target serve
--engine sglang --tp-size 2`` over the fake SGLang release (rank 0 in the server, rank 1
in a worker process the server starts). What a trainer receives over HTTP must equal the
same engine at TP=1 in process, and stopping the server must stop its worker."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from eagle3_target import Eagle3TargetModel
from eagle3_target.client import RemoteTarget
from eagle3_target.engines import sglang as sg
from eagle3_target.server.process import ServerProcess
from sglang_helpers import ragged, use_fake
from tp_fakes import FAKE_RELEASE_ENV

HERE = Path(__file__).resolve().parent
RELEASE = "0.5.16"
AUX = [1, 3, 4]


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture()
def tp_server(tiny_path):
    env = dict(os.environ, **{FAKE_RELEASE_ENV: RELEASE})
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    srv = ServerProcess(["serve", "--model", tiny_path, "--engine", "sglang", "--tp-size", "2",
                         "--dtype", "float32", "--aux-layers", ",".join(map(str, AUX)), "--port", "0"],
                        command=[sys.executable, str(HERE / "tp_serve.py")], env=env)
    srv.start(timeout=240)
    yield srv
    srv.stop()


def test_a_tp2_server_answers_what_tp1_gives_in_process(tp_server, tiny_path, monkeypatch):
    workers = _children(tp_server.pid)
    assert len(workers) == 1  # rank 1 of the server's world

    ids, mask = ragged([7, 12, 3], S=12, seed=0)
    loss = mask.clone()
    got = {}
    for mode in ("logits", "hidden"):
        with RemoteTarget(tp_server.url, mode=mode, dtype="float32") as remote:
            assert remote.info["aux_layer_ids"] == AUX
            got[mode] = remote.generate_batch(ids, mask, loss)

    use_fake(monkeypatch, RELEASE)
    with Eagle3TargetModel.from_pretrained(tiny_path, engine="sglang", dtype="float32",
                                           aux_layer_ids=AUX) as one:
        want = one.generate_batch(ids, mask, loss)
    for mode, batch in got.items():  # hidden mode's client rebuilds the logits from the LM head
        for field in ("aux_hidden_states", "input_ids", "attention_mask", "loss_mask", "logits"):
            torch.testing.assert_close(getattr(batch, field).to(getattr(want, field).dtype),
                                       getattr(want, field), rtol=1e-4, atol=1e-5, msg=f"{mode} {field}")

    tp_server.stop()
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "the server's TP worker outlived it"
