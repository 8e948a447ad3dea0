"""The native asyncio task owner leaves nothing behind on the loop."""

from __future__ import annotations

import asyncio

import pytest

from after_response import AfterResponseMiddleware
from after_response._tasks import NativeTasks

from .apps import app_adding
from .asgi import call, http_scope

pytestmark = pytest.mark.anyio


async def test_without_lifespan_no_deadline_timer_outlives_the_request_call() -> None:
    """Each request's call owns its tasks then; with the default 60 s task_timeout, a timer
    left behind would keep every such owner alive on the loop for a minute."""
    ran: list[str] = []

    async def effect() -> None:
        ran.append("effect")

    await call(AfterResponseMiddleware(app_adding(effect)), http_scope())
    assert ran == ["effect"]
    scheduled = asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
    owners = [
        handle
        for handle in scheduled
        if not handle.cancelled()
        and isinstance(getattr(handle._callback, "__self__", None), NativeTasks)
    ]
    assert owners == []
