"""Start, wait for, and stop an ``eagle3-target serve`` subprocess.

What the demo, the benchmark and the tests use to run a real server: the child binds
port 0 by default and prints ``listening on http://HOST:PORT``; :meth:`ServerProcess.start`
reads that line, then polls ``/health`` until 200. :meth:`stop` sends SIGTERM and waits;
:meth:`kill` sends SIGKILL (fault tests).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import httpx

__all__ = ["ServerProcess"]

_LISTENING = re.compile(r"listening on (http://\S+)")


class ServerProcess:
    """``ServerProcess(args=["--model", DIR], token=...)``; a context manager.

    Args:
        args: flags after ``serve`` (``--port`` defaults to 0 unless given).
        token: passed as ``$EAGLE3_TARGET_TOKEN`` (never on the command line).
        command: the argv prefix; defaults to ``python -m eagle3_target.cli serve``.
            A script that calls ``run_server`` and prints the same lines works too.
    """

    def __init__(self, args: Sequence[str] = (), *, token: str | None = None,
                 command: Sequence[str] | None = None, env: dict[str, str] | None = None):
        self.args = list(args)
        if command is None and "--port" not in self.args:
            self.args += ["--port", "0"]
        self.command = list(command) if command is not None else [
            sys.executable, "-m", "eagle3_target.cli", "serve"]
        self.token = token
        self.env = dict(os.environ if env is None else env)
        if token is not None:
            self.env["EAGLE3_TARGET_TOKEN"] = token
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.lines: list[str] = []
        self._url_ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0, *, wait_healthy: bool = True) -> "ServerProcess":
        """Starts the child and returns once ``/health`` answers 200 (or, without
        ``wait_healthy``, once it listens)."""
        self.proc = subprocess.Popen(self.command + self.args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=self.env, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._url_ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._fail("did not print its listening line")
        if not wait_healthy:
            return self
        with httpx.Client(trust_env=False, timeout=5.0) as c:
            while True:
                if self.proc.poll() is not None:
                    self._fail("exited before it was ready")
                try:
                    if c.get(f"{self.url}/health").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self._fail(f"was not healthy within {timeout:.0f} s")
                time.sleep(0.05)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = _LISTENING.search(line)
            if m and self.url is None:
                self.url = m.group(1)
                self._url_ready.set()

    def output(self) -> str:
        return "\n".join(self.lines)

    def _fail(self, what: str) -> None:
        code = self.proc.poll() if self.proc else None
        if self.proc is not None and code is None:
            self.proc.kill()
            self.proc.wait()
        time.sleep(0.1)
        raise RuntimeError(f"server {what} (exit code {code}); output:\n{self.output()[-4000:]}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; SIGKILL after ``timeout``. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
