"""What a user reads while a dump runs, stops and reruns, and what the other commands say
when a flag is wrong: each a real subprocess (no terminal) or a real dump on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from first_hour import SRC, readonly_dir, run_cli

from eagle3_target.data.rows import sample_data_path
from eagle3_target.tiny import TinyModelConfig, make_tiny_model


def test_usage_errors_name_the_fix(tiny_model_dir, tmp_path):
    cases = [
        (["bench", "--engine-arg", "foo=1"], 2, "has no option foo (--engine-arg); it takes: attn_implementation"),
        (["bench", "--device", "cuda"], 2, "use --device cpu"),
        (["forward", "--input", "x", "--out", "y", "--engine-arg", "attn_implementation=flash_attention_2"],
         2, None),
        (["serve", "--port", "99999"], 2, "--port must be in 0..65535"),
        (["serve", "--port", "-1"], 2, "--port must be in 0..65535"),
        (["info", "--aux-layers", "-1,2,3"], 2, "--aux-layers [-1] out of range"),
        (["info", "--aux-layers", "-1"], 2, "--aux-layers must hold exactly 3 layer ids"),
    ]
    for argv, code, text in cases:
        r = run_cli(*argv)
        assert r.returncode == code and "Traceback" not in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
        if text:
            assert text in r.stderr, (argv, r.stderr)


def test_flash_attention_without_the_package_says_what_to_use(tiny_model_dir, tmp_path):
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash_attn is installed here")
    except ImportError:
        pass
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"input_ids": [1, 2, 3]}\n')
    r = run_cli("forward", "--input", rows, "--out", tmp_path / "o.safetensors",
                "--engine-arg", "attn_implementation=flash_attention_2")
    assert r.returncode == 2 and "attn_implementation='flash_attention_2' cannot load here" in r.stderr
    assert "attn_implementation=sdpa or eager" in r.stderr and not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("cmd", [
    ["forward", "--input", "{rows}", "--out", "{ro}/sub/o.safetensors"],
    ["vocab", "--draft-vocab-size", "8", "--out", "{ro}/v.safetensors"],
    ["make-tiny-model", "{ro}/tiny"],
    ["dump", "--out", "{ro}/d"],
])
def test_an_output_in_a_read_only_folder_is_refused_before_loading(cmd, tmp_path, tiny_model_dir):
    ro = readonly_dir(tmp_path)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"input_ids": [1, 2, 3]}\n')
    r = run_cli(*[c.format(ro=ro, rows=rows) for c in cmd])
    assert r.returncode == 2 and "is not writable" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert str(ro) in r.stderr


def _dump_args(model, out, *extra, data=None):
    return ["dump", "--model", str(model), "--data", str(data or sample_data_path()), "--out", str(out),
            "--mode", "hidden", "--dtype", "bfloat16", "--shard-size-mb", "0.25", *extra]


def test_ctrl_c_keeps_the_finished_shards_and_the_same_command_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "d"
    # Four copies of the sample chats: enough work left after the first shard that the
    # interrupt lands mid-dump on a fast machine too.
    data = tmp_path / "chats.jsonl"
    data.write_text(sample_data_path().read_text() * 4)
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "eagle3_target.cli", *_dump_args(tiny_model_dir, out, data=data)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, env=env,
                            # A shell without job control starts background jobs with SIGINT
                            # ignored, and Python then never raises KeyboardInterrupt: give the
                            # dump the terminal's default, as a user's shell does.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    manifest = out / "manifest.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the dump ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last == (f"eagle3-target dump: interrupted; the finished shards in {out} are kept; run the same "
                    f"command again to continue")
    assert "dump: starting at row 0: 1,200 of 1,200 rows left" in stderr  # no terminal: lines, not a bar
    kept = json.loads(manifest.read_text())["shards"]
    assert kept and not list(out.glob(".tmp-*"))
    r = run_cli(*_dump_args(tiny_model_dir, out, data=data))
    assert r.returncode == 0, r.stderr
    assert f"dump: checking the {len(kept)} finished shards in {out} (sha256 of each)" in r.stderr
    assert f"dump: resuming after {len(kept)} shards at row {kept[-1]['rows'][1]:,}" in r.stderr
    assert run_cli("verify", out).returncode == 0
    # Complete: a rerun says so and loads nothing (a model folder without weights would fail to load).
    r = run_cli(*_dump_args(tiny_model_dir, out, data=data))
    assert r.returncode == 0 and "holds a complete dump" in r.stderr and "without loading the target" in r.stderr
    assert "nothing to do, the dump was already complete" in r.stdout and "tokens/s" not in r.stdout.split("\n")[2]
    # A changed setting is refused with both values.
    r = run_cli(*_dump_args(tiny_model_dir, out, "--max-length", "512", "--batch-tokens", "4096", data=data))
    assert r.returncode == 2, r.stderr
    assert "differs in: batch_tokens, max_length: batch_tokens 8192 on record, 4096 now; max_length 2048 on " \
           "record, 512 now" in r.stderr


def test_periodic_progress_lines_without_a_terminal(tmp_path, tiny_target, tok, capsys, monkeypatch):
    from eagle3_target.dump import DumpConfig, run_dump
    from eagle3_target.dump import summary

    monkeypatch.setattr(summary, "PROGRESS_LINE_SECONDS", 0.0)
    cfg = DumpConfig(out=str(tmp_path / "d"), data=[str(sample_data_path())], mode="hidden", render="thread",
                     batch_tokens=2048)
    run_dump(cfg, source=tiny_target, tokenizer=tok, log=lambda s: None)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("dump: ") and "/300 rows (" in ln]
    assert len(lines) >= 3 and lines[-1].startswith("dump: 300/300 rows (100%)"), err
    run_dump(DumpConfig(out=str(tmp_path / "e"), data=[str(sample_data_path())], mode="hidden", render="thread",
                        progress=False), source=tiny_target, tokenizer=tok, log=lambda s: None)
    assert "dump: " not in capsys.readouterr().err  # --no-progress: silent


def test_a_full_disk_leaves_no_temporary_shard_and_says_so(tiny_model_dir, tmp_path):
    import resource

    out = tmp_path / "d"
    limit = 200_000  # bytes per file: the manifest fits, a 0.25 MiB shard does not

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-m", "eagle3_target.cli", *_dump_args(tiny_model_dir, out)],
                       capture_output=True, text=True, env=env, preexec_fn=cap, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "File too large" in r.stderr and ".tmp-shard-00000.safetensors" in r.stderr
    assert "free some space" in r.stderr and "run the same command again" in r.stderr
    assert not list(out.glob(".tmp-*")), list(out.iterdir())


def test_a_server_that_wants_a_token_names_the_flag_and_the_variable(tiny_model_dir, tmp_path):
    from eagle3_target.server.process import ServerProcess

    srv = ServerProcess(["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"],
                        token="the-right-token").start()
    try:
        common = ["dump", "--server", srv.url, "--tokenizer", str(tiny_model_dir), "--out", str(tmp_path / "d")]
        (tmp_path / "t").write_text("wrong\n")
        for got, extra in (("none", []), ("a wrong one", ["--token-file", str(tmp_path / "t")])):
            r = run_cli(*common, *extra, env={"EAGLE3_TARGET_TOKEN": None})
            assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
            assert f"wants an access token and got {got} (401)" in r.stderr
            assert "--token-file FILE" in r.stderr and "$EAGLE3_TARGET_TOKEN" in r.stderr
        (tmp_path / "t").write_text("the-right-token\n")
        r = run_cli(*common, "--token-file", tmp_path / "t", "--mode", "logits")
        assert r.returncode == 0, r.stderr
    finally:
        srv.stop()
    assert "EAGLE3_TARGET_TOKEN" in " ".join(run_cli("dump", "--help").stdout.split())


def test_bench_warns_past_max_position_embeddings(tmp_path):
    model = make_tiny_model(tmp_path / "m", TinyModelConfig(layers=8, hidden=64, heads=2, kv_heads=1,
                                                            intermediate=128, vocab=300, max_position=64))
    r = run_cli("bench", "--model", model, "--batch", "1", "--seq-len", "96", "--runs", "1", "--warmup", "0")
    assert r.returncode == 0 and "--seq-len 96 is above the model's max_position_embeddings 64" in r.stderr
    r = run_cli("bench", "--model", model, "--batch", "1", "--seq-len", "64", "--runs", "1", "--warmup", "0")
    assert r.returncode == 0 and "warning" not in r.stderr
