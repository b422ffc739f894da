"""Bytes only: how tensors travel and rest, with no HTTP and no engine.

- :mod:`.st_stream` - safetensors written as a header plus the tensors' own memory, and
  read back as zero-copy views, strictly validated;
- :mod:`.v1` - the native ``/v1`` protocol: modes, parameters, tensor names, checks;
- :mod:`.nmet` - NeMo Automodel's NMET codec, for the NeMo-compatible endpoints.

The server and the client both build on this package and on nothing of each other.
"""

__all__ = ["TOKEN_ENV"]

TOKEN_ENV = "EAGLE3_TARGET_TOKEN"
"""Where the server, the command line's clients and the dump read the access token from
(never from the command line, where other users of the machine can see it)."""
