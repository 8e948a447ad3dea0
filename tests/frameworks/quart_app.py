"""Quart: views reach the collector with ``after_response.current()``; the middleware is
installed as ``app.asgi_app = AfterResponseMiddleware(app.asgi_app)``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from quart import Quart, request

from after_response import AfterResponseMiddleware, current

from . import Built, Probe, add_effect, chunks


def create_app(probe: Probe, **options: Any) -> Built:
    app = Quart(__name__)

    @app.get("/effect")
    async def effect() -> str:
        return f"queued {add_effect(current(), probe, request.args)}"

    @app.get("/stream")
    async def stream() -> AsyncIterator[bytes]:
        return chunks(add_effect(current(), probe, request.args))

    @app.get("/fail")
    async def fail() -> tuple[str, int]:
        return f"failed {add_effect(current(), probe, request.args)}", 500

    @app.get("/raise")
    async def raising() -> str:
        add_effect(current(), probe, request.args)
        raise RuntimeError("the handler failed after adding a side effect")

    @app.get("/collector")
    async def collector() -> str:
        request_id = int(request.args["id"])
        probe.collectors[request_id] = (current(), current())
        return f"collector {request_id}"

    @app.after_serving
    async def shutdown() -> None:
        probe.record("app shutdown")

    # Quart's own way to add ASGI middleware: ``app`` stays the Quart object, and Quart
    # passes every scope, lifespan included, to ``asgi_app``.
    middleware = AfterResponseMiddleware(app.asgi_app, **options)
    app.asgi_app = middleware  # type: ignore[method-assign]
    return Built(probe.wrap(app), lambda: middleware, app_lifespan=True)
