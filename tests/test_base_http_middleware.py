"""Where to install the middleware next to a ``BaseHTTPMiddleware`` (real uvicorn).

A ``BaseHTTPMiddleware`` hands the inner app's messages to the server through a memory
stream. Before Starlette 1.7.0 the inner app's final ``send`` returned as soon as the
middleware had taken the message off that stream, before the server had it, so
after-response, installed inside, could start its tasks before the client had the body.
Starlette 1.7.0 (encode/starlette#3476) holds that ``send`` until the response has gone out.

CI runs this file on the newest Starlette and again on the oldest supported one (0.40).
"""

from __future__ import annotations

from typing import Final

import anyio
import anyio.lowlevel
import httpx
import pytest
import starlette
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from after_response import AfterResponseMiddleware

from .servers import serve_uvicorn

pytestmark = pytest.mark.anyio

STARLETTE: Final = tuple(int(part) for part in starlette.__version__.split(".")[:2])
#: Before this release a BaseHTTPMiddleware outside lets tasks start before the body is sent.
HOLDS_FINAL_SEND: Final = (1, 7)
#: Event-loop turns the final body is held back for: a task that can start early starts
#: within a few (two, measured); one that cannot start never does.
HOLD_TURNS: Final = 100


class HoldFinalBody:
    """Outermost layer: before passing the final body to the server, gives the app up to
    ``HOLD_TURNS`` loop turns to start its side effect, as a slow client would."""

    def __init__(self, app: ASGIApp, events: list[str], task_started: anyio.Event) -> None:
        self.app = app
        self.events = events
        self.task_started = task_started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def held_send(message: Message) -> None:
            final = message["type"] == "http.response.body" and not message.get("more_body")
            if final:
                for _ in range(HOLD_TURNS):
                    if self.task_started.is_set():
                        break
                    await anyio.lowlevel.checkpoint()
            await send(message)
            if final:
                self.events.append("body sent")

        await self.app(scope, receive, held_send if scope["type"] == "http" else send)


async def passthrough(request: Request, call_next: RequestResponseEndpoint) -> Response:
    return await call_next(request)


async def order_of_body_and_task(*, after_response_outermost: bool) -> list[str]:
    """Serve a Starlette app with a pass-through ``BaseHTTPMiddleware`` and after-response
    added in the given order; returns the order of "body sent" and "task started"."""
    events: list[str] = []
    task_started = anyio.Event()

    async def effect() -> None:
        events.append("task started")
        task_started.set()

    async def endpoint(request: Request) -> Response:
        request.state.after_response.add(effect)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    # add_middleware puts the middleware added last outermost.
    if after_response_outermost:
        app.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)
        app.add_middleware(AfterResponseMiddleware)
    else:
        app.add_middleware(AfterResponseMiddleware)
        app.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)
    async with serve_uvicorn(HoldFinalBody(app, events, task_started)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.get("/")
        assert response.text == "ok"
        with anyio.fail_after(5):
            await task_started.wait()
    return events


async def test_outside_a_base_http_middleware_tasks_start_after_the_body_is_sent() -> None:
    assert await order_of_body_and_task(after_response_outermost=True) == [
        "body sent",
        "task started",
    ]


@pytest.mark.skipif(
    STARLETTE < HOLDS_FINAL_SEND, reason=f"Starlette {starlette.__version__} is before 1.7"
)
async def test_inside_a_base_http_middleware_tasks_start_after_the_body_from_starlette_1_7() -> (
    None
):
    assert await order_of_body_and_task(after_response_outermost=False) == [
        "body sent",
        "task started",
    ]


@pytest.mark.skipif(
    STARLETTE >= HOLDS_FINAL_SEND, reason=f"Starlette {starlette.__version__} is 1.7 or later"
)
async def test_inside_a_base_http_middleware_tasks_start_before_the_body_before_starlette_1_7() -> (
    None
):
    assert await order_of_body_and_task(after_response_outermost=False) == [
        "task started",
        "body sent",
    ]
