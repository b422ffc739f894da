"""Helpers of the first-hour tests: the CLI run as a real subprocess, a folder nobody
may write to, and a model folder without a tokenizer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parent.parent / "src")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300,
            input: str | None = None) -> subprocess.CompletedProcess:
    """``eagle3-target ARGS`` in a fresh interpreter, stdin empty, no terminal; ``env``
    adds variables (None removes one)."""
    full = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    full.pop("EAGLE3_TARGET_DEBUG", None)
    full = {k: v for k, v in full.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "eagle3_target.cli", *map(str, args)], capture_output=True,
                          text=True, env=full, timeout=timeout, input=input or "")


def readonly_dir(tmp_path: Path) -> Path:
    """A folder no file can be created in: mode 0555 for a normal user; for root (who
    ignores modes) a sysfs folder, which refuses new files to root too."""
    if os.geteuid() != 0:
        d = tmp_path / "read-only"
        d.mkdir()
        d.chmod(0o555)
        return d
    d = Path("/sys/kernel")
    try:
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError:
        return d
    pytest.skip("running as root with a writable /sys/kernel: no read-only folder to test with")


def model_without_tokenizer(src: Path, dst: Path) -> Path:
    """A copy of the model folder ``src`` with its config and weights only."""
    dst.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst
