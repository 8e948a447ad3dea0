"""The native asyncio task owner leaves nothing behind on the loop."""

from __future__ import annotations

import asyncio

import pytest

from after_response import AfterResponseMiddleware
from after_response._tasks import HAS_UNCANCEL, NativeTasks

from .apps import app_adding
from .asgi import call, http_scope

pytestmark = pytest.mark.anyio


async def test_without_lifespan_requests_share_one_deadline_timer() -> None:
    """Without lifespan, the requests of a loop share one task owner and its one deadline
    timer: with the default 60 s task_timeout, a timer per request would pile up on the
    loop for a minute under load."""
    ran: list[str] = []

    async def effect() -> None:
        ran.append("effect")

    middleware = AfterResponseMiddleware(app_adding(effect))
    for _ in range(5):
        await call(middleware, http_scope())
    assert ran == ["effect"] * 5
    scheduled = asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
    timers = [
        handle
        for handle in scheduled
        if not handle.cancelled()
        and isinstance(getattr(handle._callback, "__self__", None), NativeTasks)
    ]
    # One shared timer where deadlines are the task owner's (3.11+: Task.uncancel); on 3.10
    # they are cancel scopes, and the owner keeps no timer at all. Never one per request.
    assert len(timers) == (1 if HAS_UNCANCEL else 0)
