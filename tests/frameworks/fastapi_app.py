"""FastAPI: the ``AfterResponse`` dependency, ``request.state`` and ``current()``, with the
middleware installed by ``app.add_middleware``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from after_response import AfterResponseMiddleware, current
from after_response.fastapi import AfterResponse

from . import Built, Probe, add_effect, chunks

RequestId = Annotated[int, Query(alias="id")]


def create_app(probe: Probe, **options: Any) -> Built:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        probe.record("app shutdown")

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(AfterResponseMiddleware, **options)

    @app.get("/effect", response_class=PlainTextResponse)
    async def effect(request: Request, after: AfterResponse) -> str:
        request_id = add_effect(after, probe, request.query_params)
        return f"queued {request_id}"

    @app.get("/stream")
    async def stream(request: Request, after: AfterResponse) -> StreamingResponse:
        request_id = add_effect(after, probe, request.query_params)
        return StreamingResponse(chunks(request_id), media_type="text/plain")

    @app.get("/fail")
    async def fail(request: Request) -> PlainTextResponse:
        request_id = add_effect(request.state.after_response, probe, request.query_params)
        return PlainTextResponse(f"failed {request_id}", status_code=500)

    @app.get("/raise")
    async def raising(request: Request, after: AfterResponse) -> None:
        add_effect(after, probe, request.query_params)
        raise RuntimeError("the handler failed after adding a side effect")

    # A sync path operation: FastAPI runs it, and its dependencies, in a worker thread.
    @app.get("/collector", response_class=PlainTextResponse)
    def collector(request_id: RequestId, request: Request, after: AfterResponse) -> str:
        probe.collectors[request_id] = (after, request.state.after_response, current())
        return f"collector {request_id}"

    return Built(probe.wrap(app), lambda: find_middleware(app), app_lifespan=True)


def find_middleware(app: FastAPI) -> AfterResponseMiddleware:
    """The instance ``add_middleware`` created (Starlette builds it on the first call)."""
    layer: Any = app.middleware_stack
    while layer is not None and not isinstance(layer, AfterResponseMiddleware):
        layer = getattr(layer, "app", None)
    assert layer is not None, "the app has not started yet, or has no AfterResponseMiddleware"
    return layer
