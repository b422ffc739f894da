"""NeMo Automodel's remote-target endpoints at the root (``/model_info``,
``/input_embeddings``, ``/set_vocab_mapping``, ``/generate``, ``/init_nccl``,
``/heartbeat``, ``/disconnect``), so NeMo's own ``RemoteEagle3TargetModel`` works
against this server unmodified. Bodies are NMET (:mod:`eagle3_target.wire.nmet`).

One draft vocabulary at a time: NeMo's client sends no client identity, so a second,
different ``/set_vocab_mapping`` is refused (409 ``vocab_mapping_conflict``) until the
first client's ``/disconnect``; no ``/generate`` is ever answered with another client's
mapping.
"""

from __future__ import annotations

import asyncio
import logging

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from eagle3_target.errors import ApiError, NMETError
from eagle3_target.server.state import (
    OCTET,
    HeldResponse,
    ServerState,
    answer_bytes,
    context_length,
    json_response,
    mapping_from,
    model_info,
)
from eagle3_target.server.worker import Job
from eagle3_target.wire import nmet
from eagle3_target.wire.v1 import NEMO_GENERATE, check_inputs

__all__ = ["add_routes", "NEMO_ONE_MAPPING"]

NEMO_ONE_MAPPING = (
    "this server already holds another client's draft vocabulary (Vd={held}; yours has "
    "Vd={new}): NeMo's /set_vocab_mapping and /generate carry no client or mapping id, so "
    "one server serves one NeMo mapping at a time, until its client POSTs /disconnect "
    "(NeMo's close()). Give each trainer with its own mapping its own server, or use the "
    "native /v1 protocol (RemoteTarget), which keeps many mappings apart by id")

log = logging.getLogger("eagle3_target.server")


def add_routes(app: FastAPI, state: ServerState) -> None:
    """Adds NeMo's endpoints to ``app``."""

    # ------------------------------------------------------------------ NeMo root
    @app.post("/model_info")
    async def nemomodel_info(request: Request) -> JSONResponse:
        target = state.target
        await state.read_body(request, binary=False)
        return json_response(model_info(target))

    @app.post("/input_embeddings")
    async def nemo_input_embeddings(request: Request) -> Response:
        target = state.target
        await state.read_body(request, binary=False)

        def build() -> bytes:
            w = target.get_input_embeddings().weight
            return nmet.encode({"weight": w.detach().to("cpu")})

        return Response(await run_in_threadpool(build), media_type=OCTET)

    def _nmet(body: bytes) -> dict[str, torch.Tensor | None]:
        try:
            return nmet.decode(body)
        except NMETError as e:
            raise ApiError(400, "bad_body", f"body is not a valid NMET blob: {e}") from None

    @app.post("/set_vocab_mapping")
    async def nemo_set_vocab_mapping(request: Request) -> JSONResponse:
        target = state.target
        body = await state.read_body(request, binary=False)
        tensors = await run_in_threadpool(_nmet, body)
        mapping = await run_in_threadpool(mapping_from, tensors, target.vocab_size)
        held = state.nemo_mapping
        # NeMo's client names no client and no mapping on /generate, so the server cannot
        # tell whose mapping a /generate means: one mapping at a time, and a different
        # one is refused rather than swapped under another client's feet.
        if held is not None and held.mapping_id != mapping.mapping_id:
            raise ApiError(409, "vocab_mapping_conflict", NEMO_ONE_MAPPING.format(
                held=held.draft_vocab_size, new=mapping.draft_vocab_size))
        state.nemo_mapping = mapping
        state.register(mapping)
        return json_response({"status": "ok"})

    @app.post("/generate")
    async def nemo_generate(request: Request) -> Response:
        target = state.target
        body = await state.read_body(request, binary=False)
        mapping = state.nemo_mapping

        def prepare():
            tensors = _nmet(body)
            checked = check_inputs(tensors, vocab_size=target.vocab_size, need_loss_mask=True,
                                   max_tokens=state.settings.max_batch_tokens,
                                max_seq=context_length(target))
            return checked, tensors["input_ids"].dtype, tensors["loss_mask"].dtype

        (ids, mask, loss), ids_dtype, loss_dtype = await run_in_threadpool(prepare)
        if mapping is None:
            raise ApiError(409, "no_vocab_mapping", "POST /set_vocab_mapping before /generate")
        job = Job(mode=NEMO_GENERATE.name, input_ids=ids, attention_mask=mask, loss_mask=loss, mapping=mapping)
        held = await state.budget.acquire(answer_bytes(NEMO_GENERATE.name, ids, target, mapping=mapping,
                                                       float_bytes=state.worker.float_bytes(job.kind)))
        try:
            res = await state.run(job)
            # NeMo's in-process path shifts the tensors it was given, keeping their dtype.
            res["input_ids"] = res["input_ids"].to(ids_dtype)
            res["loss_mask"] = res["loss_mask"].to(loss_dtype)
            data = await run_in_threadpool(nmet.encode, res)
        except BaseException:
            state.budget.release(held)
            raise
        state.metrics.tokens.labels("nemo").inc(job.real_tokens)
        return HeldResponse(data, lambda: state.budget.release(held), media_type=OCTET,
                            headers={"X-Eagle3-Batch-Requests": str(job.batch_requests)})

    @app.post("/init_nccl")
    async def nemo_init_nccl(request: Request) -> JSONResponse:
        await state.read_body(request, binary=False)
        return json_response({"status": "disabled"})

    @app.post("/heartbeat")
    async def nemo_heartbeat(request: Request) -> JSONResponse:
        await state.read_body(request, binary=False)
        return json_response({"status": "ok"})

    @app.post("/disconnect")
    async def nemo_disconnect(request: Request) -> JSONResponse:
        await state.read_body(request, binary=False)
        # NeMo's client says goodbye from close(): its mapping goes with it, so the next
        # trainer may set its own.
        state.nemo_mapping = None
        if state.settings.exit_on_disconnect and state.request_shutdown is not None:
            log.info("client disconnected; shutting down (--exit-on-disconnect)")
            asyncio.get_running_loop().call_later(0.05, state.request_shutdown)
        return json_response({"status": "ok"})
