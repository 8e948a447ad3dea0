"""The native asyncio task owner leaves nothing behind on the loop."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Receive, Scope, Send

from after_response import AfterResponseMiddleware, current
from after_response._tasks import NativeTasks

from .asgi import call, http_scope

pytestmark = pytest.mark.anyio


async def test_without_lifespan_no_deadline_timer_outlives_the_request_call() -> None:
    """Each request's call owns its tasks then; with the default 60 s task_timeout, a timer
    left behind would keep every such owner alive on the loop for a minute."""
    ran: list[str] = []

    async def effect() -> None:
        ran.append("effect")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan")
        current().add(effect)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    await call(AfterResponseMiddleware(app), http_scope())
    assert ran == ["effect"]
    scheduled = asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
    owners = [
        handle
        for handle in scheduled
        if not handle.cancelled()
        and isinstance(getattr(handle._callback, "__self__", None), NativeTasks)
    ]
    assert owners == []
