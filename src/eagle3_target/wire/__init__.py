"""Bytes only: how tensors travel and rest, with no HTTP and no engine.

- :mod:`.st_stream` - safetensors written as a header plus the tensors' own memory, and
  read back as zero-copy views, strictly validated;
- :mod:`.v1` - the native ``/v1`` protocol: modes, parameters, tensor names, checks;
- :mod:`.nmet` - NeMo Automodel's NMET codec, for the NeMo-compatible endpoints.

The server and the client both build on this package and on nothing of each other.
"""

import os
from pathlib import Path

__all__ = ["TOKEN_ENV", "read_token"]

TOKEN_ENV = "EAGLE3_TARGET_TOKEN"
"""Where the server, the command line's clients and the dump read the access token from
(never from the command line, where other users of the machine can see it)."""


def read_token(token_file: str | None, env: dict[str, str] | None = None) -> str | None:
    """The token from ``--token-file`` (first line, stripped) or ``$EAGLE3_TARGET_TOKEN``."""
    env = os.environ if env is None else env
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise ValueError(f"--token-file {token_file}: no such file")
        token = path.read_text(encoding="utf-8").strip().splitlines()
        value = token[0].strip() if token else ""
        if not value:
            raise ValueError(f"--token-file {token_file}: the file is empty")
        return value
    value = env.get(TOKEN_ENV)
    if value is not None:
        value = value.strip()
        if not value:
            raise ValueError(f"${TOKEN_ENV} is set but empty")
        return value
    return None
