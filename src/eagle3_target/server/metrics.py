"""Prometheus metrics of one server, in their own registry (never the global one, so
several servers in one process, as in tests, do not collide).

Names (all prefixed ``eagle3_``): requests, latency, response bytes and errors by
endpoint and code; supervised tokens by mode; queue depth; engine calls, requests
merged per call, padded tokens per call, engine seconds; out-of-memory events.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["ServerMetrics", "CONTENT_TYPE_LATEST"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_REQ_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("eagle3_requests_total", "HTTP requests by endpoint, method and "
                                "status code", ["endpoint", "method", "code"], registry=r)
        self.errors = Counter("eagle3_errors_total", "HTTP responses with status >= 400, by "
                              "endpoint and code", ["endpoint", "code"], registry=r)
        self.latency = Histogram("eagle3_request_duration_seconds", "Time from request to the "
                                 "end of the response", ["endpoint"], buckets=_LATENCY_BUCKETS,
                                 registry=r)
        self.bytes_out = Counter("eagle3_response_bytes_total", "Response body bytes sent",
                                 ["endpoint"], registry=r)
        self.tokens = Counter("eagle3_supervision_tokens_total", "Real (attention_mask=1) tokens "
                              "supervised, by mode", ["mode"], registry=r)
        self.in_flight = Gauge("eagle3_requests_in_flight", "Requests being handled (all "
                               "endpoints but /health and /metrics)", registry=r)
        self.queue_depth = Gauge("eagle3_queue_depth", "Requests waiting for the engine",
                                 registry=r)
        self.engine_batches = Counter("eagle3_engine_batches_total", "Engine calls, by forward "
                                      "kind", ["kind"], registry=r)
        self.engine_batch_requests = Histogram("eagle3_engine_batch_requests", "Requests merged "
                                               "into one engine call", buckets=_REQ_BUCKETS,
                                               registry=r)
        self.engine_batch_tokens = Histogram("eagle3_engine_batch_padded_tokens", "Rows x "
                                             "longest row of one engine call",
                                             buckets=_TOKEN_BUCKETS, registry=r)
        self.engine_merged = Counter("eagle3_engine_merged_requests_total", "Requests that "
                                     "shared an engine call with at least one other request",
                                     registry=r)
        self.engine_seconds = Histogram("eagle3_engine_seconds", "Engine call time, forward and "
                                        "split", buckets=_LATENCY_BUCKETS, registry=r)
        self.oom = Counter("eagle3_engine_oom_total", "Engine out-of-memory events", registry=r)
        self.ready = Gauge("eagle3_ready", "1 once the model is loaded and serving", registry=r)

    def observe_request(self, endpoint: str, method: str, code: int, seconds: float,
                        nbytes: int) -> None:
        self.requests.labels(endpoint, method, str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)
        self.bytes_out.labels(endpoint).inc(nbytes)
        if code >= 400:
            self.errors.labels(endpoint, str(code)).inc()

    def observe_batch(self, kind: str, n_requests: int, padded: int, real: int,
                      seconds: float) -> None:
        self.engine_batches.labels(kind).inc()
        self.engine_batch_requests.observe(n_requests)
        self.engine_batch_tokens.observe(padded)
        self.engine_seconds.observe(seconds)
        if n_requests > 1:
            self.engine_merged.inc(n_requests)

    def render(self) -> bytes:
        return generate_latest(self.registry)
