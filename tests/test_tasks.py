"""The native asyncio task owner leaves nothing behind on the loop."""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from typing import Any

import pytest

import after_response
from after_response import AfterResponseMiddleware
from after_response._tasks import HAS_UNCANCEL, NativeTasks

from .apps import app_adding
from .asgi import call, http_scope, lifespan

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


@pytest.mark.parametrize(
    "task_timeout",
    [
        pytest.param(None, id="no deadline"),
        pytest.param(
            60.0,
            id="a deadline",
            marks=pytest.mark.skipif(
                not HAS_UNCANCEL,
                reason="3.10: the deadline is anyio's cancel scope, whose cancelled timer keeps "
                "a copy of the context until the loop drops it",
            ),
        ),
    ],
)
async def test_a_side_effect_lets_go_of_its_arguments_as_soon_as_it_ends(
    task_timeout: float | None,
) -> None:
    """A side effect's arguments (a rendered email, an upload) are freed when it ends: not
    a loop turn later when its asyncio task's done callbacks run (under load, a turn holds
    hundreds of finished tasks), nor when its deadline's timer fires (60 s by default).
    Without lifespan the request's ASGI call holds its tasks until the last one ends."""

    class Payload:
        pass

    payloads: list[weakref.ref[Payload]] = []
    seen: list[bool] = []
    checked = asyncio.Event()

    def payload() -> Payload:
        made = Payload()
        payloads.append(weakref.ref(made))
        return made

    async def effect(payload: Payload) -> None:
        def check() -> None:  # runs before the finished task's done callbacks
            seen.append(payloads[0]() is None)
            checked.set()

        # In an empty context: a copy of this one would hold the running task itself.
        asyncio.get_running_loop().call_soon(check, context=contextvars.Context())

    async def app(scope: Any, receive: Any, send: Any) -> None:
        after_response.current().add(effect, payload())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = AfterResponseMiddleware(app, task_timeout=task_timeout)
    async with lifespan(middleware):
        await call(middleware, http_scope())
        await checked.wait()
    assert seen == [True]
