"""The client side: the target behind one or more ``eagle3-target serve`` processes,
with the surface of :class:`~eagle3_target.Eagle3TargetModel`.

- :mod:`.remote` - :class:`RemoteTarget` (modes, the LM head, prefetch, bulk reads);
- :mod:`.answers` - decoding and checking what a server answers;
- :mod:`.failover` - which server takes a request, cool-downs, URL credentials;
- :mod:`.http_pool` - keep-alive HTTP/1.1 connections that read bodies into a buffer.

It speaks the protocol in :mod:`eagle3_target.wire` and imports nothing of the server.
"""

from eagle3_target.client.remote import RemoteTarget, TopKBatch
from eagle3_target.errors import RemoteTargetError, RemoteTargetUnavailable

__all__ = ["RemoteTarget", "RemoteTargetError", "RemoteTargetUnavailable", "TopKBatch"]
