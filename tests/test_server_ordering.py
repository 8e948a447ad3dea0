"""Side effects start only after the server has the whole response (real uvicorn)."""

from __future__ import annotations

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from after_response import AfterResponseMiddleware

from .apps import SendRecorder, app_adding
from .servers import serve_uvicorn

pytestmark = pytest.mark.anyio


async def test_client_gets_the_response_while_its_side_effect_is_still_running() -> None:
    release = anyio.Event()
    finished: list[str] = []

    async def slow_email() -> None:
        await release.wait()
        finished.append("email")

    middleware = AfterResponseMiddleware(app_adding(slow_email))
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        with anyio.fail_after(5):
            response = await client.get("/")
        assert response.status_code == 200
        assert response.text == "ok"
        assert finished == []
        assert middleware.stats().running == 1
        release.set()
        assert await middleware.drain(timeout=5)
    assert finished == ["email"]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_task_starts_after_the_final_body_send_returned(method: str) -> None:
    events: list[str] = []

    async def effect() -> None:
        events.append("task started")

    middleware = AfterResponseMiddleware(app_adding(effect))
    async with serve_uvicorn(SendRecorder(middleware, events)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.request(method, "/")
        assert response.status_code == 200
        assert await middleware.drain(timeout=5)
    assert events == ["body sent", "task started"]


async def test_streaming_response_runs_tasks_after_the_last_chunk() -> None:
    events: list[str] = []

    async def effect() -> None:
        events.append("task started")

    async def chunks() -> object:
        for chunk in (b"a", b"b", b"c"):
            yield chunk

    async def endpoint(request: Request) -> StreamingResponse:
        request.state.after_response.add(effect)
        return StreamingResponse(chunks())

    middleware = AfterResponseMiddleware(Starlette(routes=[Route("/", endpoint)]))
    async with serve_uvicorn(SendRecorder(middleware, events)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.get("/")
        assert response.content == b"abc"
        assert await middleware.drain(timeout=5)
    assert events[-2:] == ["body sent", "task started"]
    assert events.count("chunk sent") >= 3


async def test_asgi_call_returns_once_tasks_are_queued_not_when_they_finish() -> None:
    release = anyio.Event()
    call_returned = anyio.Event()

    async def blocked() -> None:
        await release.wait()

    inner = AfterResponseMiddleware(app_adding(blocked))

    async def outer(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        await inner(scope, receive, send)  # type: ignore[arg-type]
        if scope["type"] == "http":
            call_returned.set()

    async with serve_uvicorn(outer) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        with anyio.fail_after(5):
            await call_returned.wait()
        assert inner.stats().running == 1
        release.set()
        assert await inner.drain(timeout=5)
