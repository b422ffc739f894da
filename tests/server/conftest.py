"""Fixtures for the server tests: the tiny model, an in-process reference, and one
shared real server process (token-protected, small limits) on loopback."""

from __future__ import annotations

import secrets

import httpx
import pytest

from eagle3_target import Eagle3TargetModel
from eagle3_target.tiny import tiny_model_path
from eagle3_target.server.process import ServerProcess
from server_helpers import MAX_BATCH_TOKENS, MAX_REQUEST_BYTES, server_args


@pytest.fixture(scope="session")
def tiny_path() -> str:
    return str(tiny_model_path())


@pytest.fixture(scope="session")
def reference(tiny_path: str) -> Eagle3TargetModel:
    """The same model in process (fp32, CPU): what every server answer must equal."""
    t = Eagle3TargetModel.from_pretrained(tiny_path, engine="hf", device="cpu", dtype="float32")
    yield t
    t.close()


@pytest.fixture(scope="session")
def token() -> str:
    return "test-" + secrets.token_urlsafe(12)


@pytest.fixture(scope="session")
def server(tiny_path: str, token: str) -> ServerProcess:
    srv = ServerProcess(server_args(tiny_path, "--max-request-bytes", str(MAX_REQUEST_BYTES),
                                    "--max-batch-tokens", str(MAX_BATCH_TOKENS)), token=token)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture()
def http(server: ServerProcess, token: str) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"},
                      trust_env=False, timeout=60) as c:
        yield c
