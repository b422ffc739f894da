"""The native ``/v1`` routes: model info, input embeddings, the LM head, draft
vocabularies (content-addressed, several at once) and ``/v1/supervision``.

Bodies are safetensors (``docs/protocol.md``). Handlers validate fully before queueing
work on the worker; decoding and encoding run in threads, so the event loop never
blocks on a large body, and a supervision answer is streamed from the result tensors'
own memory (:class:`SafetensorsStream`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from eagle3_target.contract import HiddenRunner
from eagle3_target.errors import ApiError
from eagle3_target.server.identity import folder_identity
from eagle3_target.server.state import (
    OCTET,
    ServerState,
    answer_bytes,
    context_length,
    json_response,
    mapping_from,
    model_info,
)
from eagle3_target.server.worker import Job
from eagle3_target.wire.v1 import (
    MAX_TOPK,
    MODES,
    OUTPUT_DTYPES,
    PROTOCOL_VERSION,
    check_inputs,
    decode_safetensors,
    encode_safetensors,
    parse_supervision_params,
    safetensors_parts,
)

__all__ = ["SafetensorsStream", "add_routes"]


class SafetensorsStream(Response):
    """A safetensors body sent as its header and then the tensors' own memory.

    ``/v1/supervision`` answers hundreds of MB per request on a GPU (268 MB for a
    4x2048 hidden-mode request of an 8B model); building one ``bytes`` object first
    costs a full copy into fresh memory (about 1.5 GB/s there). Here Content-Length is
    known from the header, and the body goes out as ``chunk``-sized memoryviews of the
    (pinned, contiguous) result tensors, which uvicorn's httptools protocol hands
    straight to the transport (its h11 protocol joins each chunk into bytes: one copy
    of ``chunk`` bytes at a time, never of the whole body). Chunking also keeps the
    transport's write buffer small: uvicorn waits for it to drain before the next one.
    """

    media_type = OCTET

    def __init__(self, header: bytes, pieces: list[memoryview], *, headers: dict[str, str],
                 chunk: int = 1 << 20, on_done: Callable[[], None] | None = None):
        self._header, self._pieces, self._chunk = header, pieces, chunk
        self._on_done = on_done
        super().__init__(b"", media_type=OCTET, headers=headers)
        self.headers["content-length"] = str(len(header) + sum(p.nbytes for p in pieces))

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self._header, "more_body": True})
            for piece in self._pieces:
                for off in range(0, piece.nbytes, self._chunk):
                    await send({"type": "http.response.body", "body": piece[off:off + self._chunk],
                                "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._pieces = []
            if self._on_done is not None:
                self._on_done()


def add_routes(app: FastAPI, state: ServerState) -> None:
    """Adds the ``/v1`` endpoints to ``app``."""

    # ------------------------------------------------------------------ native /v1
    @app.get("/v1/model_info")
    async def v1model_info() -> JSONResponse:
        target = state.target
        runner = target.runner
        modes = [m for m in MODES if m != "hidden" or isinstance(runner, HiddenRunner)]
        try:
            p = next(iter(target.model.parameters()))
            dtype, device = str(p.dtype).replace("torch.", ""), str(p.device)
        except Exception:
            dtype = device = "unknown"
        return json_response({
            "protocol": PROTOCOL_VERSION,
            "model": state.settings.model_name,
            **folder_identity(state.settings.model_name),
            "engine": state.settings.engine,
            **model_info(target),
            "dtype": dtype,
            "device": device,
            "modes": modes,
            "output_dtypes": list(OUTPUT_DTYPES),
            "max_topk": MAX_TOPK,
            "max_batch_tokens": state.settings.max_batch_tokens,
            "max_request_tokens": state.settings.max_batch_tokens,
            "max_request_bytes": state.settings.max_request_bytes,
            "max_context": context_length(target),
        })

    @app.get("/v1/input_embeddings")
    async def v1_input_embeddings() -> Response:
        target = state.target

        def build() -> bytes:
            w = target.get_input_embeddings().weight
            return encode_safetensors({"weight": w})

        return Response(await run_in_threadpool(build), media_type=OCTET)

    @app.get("/v1/lm_head")
    async def v1_lm_head() -> Response:
        target = state.target
        if not isinstance(target.runner, HiddenRunner):
            raise ApiError(501, "not_supported", f"engine {state.settings.engine!r} does not expose its "
                                                 "LM head (hidden mode unavailable)")

        def build() -> bytes:
            tensors, _ = target.lm_head().to_tensors()
            return encode_safetensors(tensors)

        return Response(await run_in_threadpool(build), media_type=OCTET)

    @app.post("/v1/vocab_mapping")
    async def v1_vocab_mapping(request: Request) -> JSONResponse:
        target = state.target
        body = await state.read_body(request)
        tensors = await run_in_threadpool(decode_safetensors, body)
        mapping = await run_in_threadpool(mapping_from, tensors, target.vocab_size)
        mid = state.register(mapping)
        return json_response({"mapping_id": mid, "draft_vocab_size": mapping.draft_vocab_size,
                      "target_vocab_size": mapping.target_vocab_size})

    @app.post("/v1/supervision")
    async def v1_supervision(request: Request) -> Response:
        target = state.target
        query = request.query_params
        dup = [k for k in set(query.keys()) if len(query.getlist(k)) > 1]
        if dup:
            raise ApiError(422, "invalid_parameter", f"query parameter {dup[0]!r}: given more "
                                                     "than once", field=dup[0])
        params = parse_supervision_params(dict(query))
        if params.mode == "hidden" and not isinstance(target.runner, HiddenRunner):
            raise ApiError(501, "not_supported", f"engine {state.settings.engine!r} has no hidden mode")
        mapping = None
        if params.mode == "draft":
            mapping = state.mappings.get(params.mapping_id or "")
            if mapping is None:
                raise ApiError(422, "unknown_mapping", f"mapping_id {params.mapping_id!r} is not "
                               "registered here: POST it to /v1/vocab_mapping first",
                               field="mapping_id")
        body = await state.read_body(request)

        def prepare():
            tensors = decode_safetensors(body)
            return check_inputs(tensors, vocab_size=target.vocab_size,
                                need_loss_mask=params.mode == "draft",
                                max_tokens=state.settings.max_batch_tokens,
                                max_seq=context_length(target))

        ids, mask, loss = await run_in_threadpool(prepare)
        job = Job(mode=params.mode, input_ids=ids, attention_mask=mask, loss_mask=loss,
                  mapping=mapping, out_dtype=OUTPUT_DTYPES[params.dtype], k=params.k,
                  alone=params.batch == "alone")
        held = await state.budget.acquire(answer_bytes(
            params.mode, ids, target, dtype=params.dtype, k=params.k, mapping=mapping,
            float_bytes=state.worker.float_bytes(job.kind)))
        try:
            res = await state.run(job)
            meta = {"protocol": str(PROTOCOL_VERSION), "mode": params.mode,
                    "aux_layer_ids": json.dumps(list(target.aux_layer_ids))}
            header, pieces = await run_in_threadpool(safetensors_parts, res, meta)
        except BaseException:
            state.budget.release(held)
            raise
        del res
        state.metrics.tokens.labels(params.mode).inc(job.real_tokens)
        return SafetensorsStream(header, pieces, on_done=lambda: state.budget.release(held),
                                 headers={"X-Eagle3-Batch-Requests": str(job.batch_requests)})
