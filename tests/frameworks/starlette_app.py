"""Starlette: handlers reach the collector as ``request.state.after_response``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from after_response import current

from . import Built, Probe, add_effect, chunks, wrapped


def create_app(probe: Probe, **options: Any) -> Built:
    async def effect(request: Request) -> PlainTextResponse:
        request_id = add_effect(request.state.after_response, probe, request.query_params)
        return PlainTextResponse(f"queued {request_id}")

    async def stream(request: Request) -> StreamingResponse:
        request_id = add_effect(request.state.after_response, probe, request.query_params)
        return StreamingResponse(chunks(request_id), media_type="text/plain")

    async def fail(request: Request) -> PlainTextResponse:
        request_id = add_effect(request.state.after_response, probe, request.query_params)
        return PlainTextResponse(f"failed {request_id}", status_code=500)

    async def raising(request: Request) -> PlainTextResponse:
        add_effect(request.state.after_response, probe, request.query_params)
        raise RuntimeError("the handler failed after adding a side effect")

    async def collector(request: Request) -> PlainTextResponse:
        request_id = int(request.query_params["id"])
        probe.collectors[request_id] = (request.state.after_response, current())
        return PlainTextResponse(f"collector {request_id}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        probe.record("app shutdown")

    app = Starlette(
        routes=[
            Route("/effect", effect),
            Route("/stream", stream),
            Route("/fail", fail),
            Route("/raise", raising),
            Route("/collector", collector),
        ],
        lifespan=lifespan,
    )
    return wrapped(app, probe, app_lifespan=True, **options)
