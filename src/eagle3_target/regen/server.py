"""``regenerate --server URL``: any OpenAI-compatible chat server (vLLM, SGLang, TGI and
the like) as the engine, through ``POST /v1/chat/completions``.

Bounded concurrency (``--batch-size`` requests in flight, from a thread pool; the
server batches them itself), a timeout per request, and retries with exponential
backoff on what a restart or an overload looks like (no connection, a cut or timed-out
answer, 429, 5xx). A chat request with a seed is idempotent, so a retry can never add
a row: answers are placed by request, in order, whatever the order they finish in.
Other 4xx answers (a prompt over the server's context, say) refuse that prompt alone
and are counted as skipped; 401/403/404 stop the job (a wrong token or model name
would refuse every row).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from eagle3_target.errors import RemoteTargetError, RemoteTargetUnavailable
from eagle3_target.regen.prompts import Answer, Request

__all__ = ["ChatServerGenerator", "api_base", "RETRY_STATUS", "BACKOFF_CAP_S"]

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""Statuses retried: a server restarting, overloaded or behind a proxy that timed out."""
BACKOFF_CAP_S = 30.0
# Finish reasons of a whole answer: an end of turn or stop string, the length limit, a tool call.
_FINISHED = ("stop", "length", "tool_calls", "function_call", "eos_token", "stop_sequence")
_FATAL = {401: "the server refused the token (pass --token or set $OPENAI_API_KEY)",
          403: "the server refused the token (pass --token or set $OPENAI_API_KEY)",
          404: "the server has no such endpoint or model (check --server and --served-model)"}


def api_base(url: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` -> ``http://host:port/v1``."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--server {url!r}: expected an http:// or https:// URL")
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class ChatServerGenerator:
    """Answers prompts through an OpenAI-compatible chat server."""

    name = "server"

    def __init__(self, url: str, *, sampling: dict[str, Any], concurrency: int = 16, model: str | None = None,
                 token: str | None = None, timeout: float = 600.0, retries: int = 8,
                 template_kwargs: dict[str, Any] | None = None, backoff_s: float = 0.5,
                 log: Callable[[str], None] | None = None):
        import httpx

        self.base = api_base(url)
        self.sampling = sampling
        self.concurrency = concurrency
        self.retries = retries
        self.backoff_s = backoff_s
        self.template_kwargs = dict(template_kwargs or {})
        self.log = log or (lambda s: None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                                  limits=httpx.Limits(max_connections=concurrency + 1))
        self._lock = threading.Lock()
        self.retried = 0
        """Attempts that failed and were retried (the summary reports them)."""
        try:
            models = self._call("GET", "/models")
        except RemoteTargetError as e:
            self._http.close()
            raise ValueError(f"--server {url}: {e}") from None
        listed = [m for m in models.get("data", []) if isinstance(m, dict)]
        if model is None:
            if not listed:
                self._http.close()
                raise ValueError(f"--server {url}: /v1/models lists no model; pass --served-model NAME")
            model = str(listed[0]["id"])
        self.model = model
        entry = next((m for m in listed if m.get("id") == model), {})
        # vLLM and SGLang say their context here; others leave it to a 400 per prompt.
        ctx = entry.get("max_model_len") or entry.get("context_length")
        self.context = int(ctx) if isinstance(ctx, int) and ctx > 0 else None

    # -- HTTP -----------------------------------------------------------------------
    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request with retries; the JSON answer, :class:`_Refused` on a 4xx that
        refuses this request alone, or RemoteTargetError/RemoteTargetUnavailable."""
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.retried += 1
                time.sleep(min(BACKOFF_CAP_S, self.backoff_s * 2 ** (attempt - 1)))
            try:
                r = self._http.request(method, self.base + path, json=body)
            except httpx.TransportError as e:  # refused, reset, timed out, cut off
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code in RETRY_STATUS:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            if r.status_code in _FATAL:
                raise RemoteTargetError(f"{self.base}{path}: HTTP {r.status_code}: {_FATAL[r.status_code]} "
                                        f"({_detail(r)})", status=r.status_code, url=self.base)
            if r.status_code >= 400:
                raise _Refused(f"HTTP {r.status_code}: {_detail(r)}")
            try:
                out = r.json()
            except ValueError:
                last = f"HTTP {r.status_code} with a body that is not JSON"
                continue
            if not isinstance(out, dict):
                raise RemoteTargetError(f"{self.base}{path}: the answer is not a JSON object", url=self.base)
            return out
        raise RemoteTargetUnavailable(f"{self.base}{path}: no answer after {self.retries + 1} attempts "
                                      f"(last: {last}); raise --retries or --timeout", url=self.base)

    def _one(self, req: Request) -> Answer:
        s = self.sampling
        body: dict[str, Any] = {"model": self.model, "messages": req.messages, "max_tokens": s["max_new_tokens"],
                                "temperature": s["temperature"], "top_p": s["top_p"], "seed": req.seed, "n": 1}
        if req.tools is not None:
            body["tools"] = req.tools
        if self.template_kwargs:
            body["chat_template_kwargs"] = self.template_kwargs
        try:
            out = self._call("POST", "/chat/completions", body)
        except _Refused as e:
            return Answer.refusal(str(e))
        try:
            choice = out["choices"][0]
            msg = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise RemoteTargetError(f"{self.base}/chat/completions: an answer without choices[0].message",
                                    url=self.base) from None
        reason = str(choice.get("finish_reason") or "stop")
        if reason not in _FINISHED:  # "abort" and the like: the server gave up on this prompt
            return Answer.refusal(f"finish_reason {reason!r}")
        usage = out.get("usage") or {}
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        answer = Answer(msg.get("content") or "", reason,
                        int(usage.get("completion_tokens") or 0), reasoning if reasoning else None,
                        usage.get("prompt_tokens"))
        if msg.get("tool_calls"):
            answer.tool_calls = msg["tool_calls"]
        return answer

    # -- Generator --------------------------------------------------------------------
    def generate(self, requests: Sequence[Request],
                 on_done: Callable[[int, int], None] | None = None) -> list[Answer]:
        """One :class:`Answer` per request, in request order; at most ``concurrency``
        requests in flight."""

        def task(req: Request) -> Answer:
            a = self._one(req)
            if on_done is not None:
                with self._lock:
                    on_done(1, a.completion_tokens)
            return a

        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="regen-http") as pool:
            return list(pool.map(task, requests))

    def close(self) -> None:
        self._http.close()


class _Refused(Exception):
    """A 4xx answer that refuses one request (not retried, counted as skipped)."""


def _detail(r: Any) -> str:
    try:
        j = r.json()
    except ValueError:
        return r.text[:300]
    if isinstance(j, dict):
        err = j.get("error", j)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:300]
        return str(j.get("message") or j.get("detail") or err)[:300]
    return str(j)[:300]
