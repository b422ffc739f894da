"""Two servers are one target only if they serve the same weights and tokenizer, not just
the same shapes: ``/v1/model_info`` reports fingerprints of both, and ``RemoteTarget``
refuses a server whose fingerprints differ from the first one's (real server
processes; a model of the same shapes and another seed; a copy in another folder)."""

from __future__ import annotations

import shutil

import pytest

from eagle3_target.client import RemoteTarget, RemoteTargetError
from eagle3_target.server.identity import folder_identity
from eagle3_target.server.process import ServerProcess
from eagle3_target.tiny import TinyModelConfig, make_tiny_model
from server_helpers import make_inputs, server_args


@pytest.fixture(scope="module")
def copies(tiny_path, tmp_path_factory):
    """The tiny model copied to another folder, the same with its chat template changed,
    and a model of the same shapes with other weights (seed 1)."""
    root = tmp_path_factory.mktemp("identity")
    same = root / "copy"
    shutil.copytree(tiny_path, same)
    other_tok = root / "other-template"
    shutil.copytree(tiny_path, other_tok)
    tpl = other_tok / "chat_template.jinja"
    tpl.write_text(tpl.read_text() + "\n")
    other = make_tiny_model(root / "seed1", TinyModelConfig(seed=1))
    return {"copy": str(same), "template": str(other_tok), "seed1": str(other)}


def test_the_fingerprints_follow_content_not_paths(tiny_path, copies):
    base = folder_identity(tiny_path)
    assert base["model_sha256"] and base["tokenizer_sha256"]
    assert folder_identity(copies["copy"]) == base
    assert folder_identity(copies["template"])["model_sha256"] == base["model_sha256"]
    assert folder_identity(copies["template"])["tokenizer_sha256"] != base["tokenizer_sha256"]
    assert folder_identity(copies["seed1"])["model_sha256"] != base["model_sha256"]
    assert folder_identity("") == {"model_sha256": None, "tokenizer_sha256": None}


@pytest.fixture(scope="module")
def servers(copies, token):
    procs = {k: ServerProcess(server_args(copies[k]), token=token).start() for k in ("copy", "seed1", "template")}
    yield procs
    for p in procs.values():
        p.stop()


def test_model_info_reports_the_fingerprints(server, servers, token, tiny_path):
    with RemoteTarget(server.url, token=token) as rt:
        assert rt.info["model_sha256"] == folder_identity(tiny_path)["model_sha256"]
        assert rt.info["tokenizer_sha256"] == folder_identity(tiny_path)["tokenizer_sha256"]


def test_a_copy_in_another_folder_is_the_same_target(server, servers, token):
    with RemoteTarget([server.url, servers["copy"].url], token=token, mode="logits", retries=0) as rt:
        list(rt.prefetch([make_inputs(i, 1, 8) for i in range(6)], depth=3))
        used = [k for k, v in rt.stats.items() if k.startswith("served_by:") and v > 0]
        assert len(used) == 2, rt.stats


@pytest.mark.parametrize("which, field", [("seed1", "model_sha256"), ("template", "tokenizer_sha256")])
def test_same_shapes_but_another_model_or_tokenizer_is_refused(which, field, server, servers, token):
    with RemoteTarget([server.url, servers[which].url], token=token, mode="logits", retries=0) as rt:
        with pytest.raises(RemoteTargetError, match=f"serves a different model than .*{field}"):
            list(rt.prefetch([make_inputs(i, 1, 8) for i in range(6)], depth=3))
