"""Litestar: handlers reach the collector as ``request.state.after_response`` (Litestar's
request state wraps ``scope["state"]``, where the middleware puts it)."""

from __future__ import annotations

from typing import Any

from litestar import Litestar, MediaType, Request, Response, get
from litestar.response import Stream

from after_response import current

from . import Built, Probe, add_effect, chunks, wrapped


def create_app(probe: Probe, **options: Any) -> Built:
    @get("/effect", media_type=MediaType.TEXT)
    async def effect(request: Request[Any, Any, Any]) -> str:
        request_id = add_effect(request.state.after_response, probe, request.query_params)
        return f"queued {request_id}"

    @get("/stream", media_type=MediaType.TEXT)
    async def stream(request: Request[Any, Any, Any]) -> Stream:
        request_id = add_effect(request.state.after_response, probe, request.query_params)
        return Stream(chunks(request_id), media_type=MediaType.TEXT)

    @get("/fail", media_type=MediaType.TEXT)
    async def fail(request: Request[Any, Any, Any]) -> Response[str]:
        request_id = add_effect(request.state.after_response, probe, request.query_params)
        return Response(f"failed {request_id}", status_code=500, media_type=MediaType.TEXT)

    @get("/raise", media_type=MediaType.TEXT)
    async def raising(request: Request[Any, Any, Any]) -> str:
        add_effect(request.state.after_response, probe, request.query_params)
        raise RuntimeError("the handler failed after adding a side effect")

    @get("/collector", media_type=MediaType.TEXT)
    async def collector(request: Request[Any, Any, Any]) -> str:
        request_id = int(request.query_params["id"])
        probe.collectors[request_id] = (request.state.after_response, current())
        return f"collector {request_id}"

    def shutdown() -> None:
        probe.record("app shutdown")

    app = Litestar(
        route_handlers=[effect, stream, fail, raising, collector],
        on_shutdown=[shutdown],
        logging_config=None,
    )
    return wrapped(app, probe, app_lifespan=True, **options)
