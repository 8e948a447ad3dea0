"""Lifespan shutdown drains side effects before the app's own shutdown (real uvicorn)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from after_response import AfterResponseMiddleware, TaskAbandonedError

from .apps import app_adding
from .servers import serve_uvicorn

pytestmark = pytest.mark.anyio


def releasing_at_shutdown(app: ASGIApp, release: anyio.Event) -> ASGIApp:
    """Sets ``release`` when the server sends lifespan shutdown: side effects that wait for it
    are certainly still running when the shutdown begins."""

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        async def receive_watching() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                release.set()
            return message

        await app(scope, receive_watching if scope["type"] == "lifespan" else receive, send)

    return outer


def app_with_lifespan(events: list[str], effect: object) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        events.append("app shutdown")

    async def endpoint(request: Request) -> PlainTextResponse:
        request.state.after_response.add(effect)
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/", endpoint)], lifespan=lifespan)


async def test_shutdown_waits_for_running_tasks_before_the_app_shuts_down() -> None:
    events: list[str] = []
    release = anyio.Event()

    async def effect() -> None:
        await release.wait()  # still running when the server is asked to stop
        for _ in range(50):  # and with work left: many turns of the loop, no clock involved
            await anyio.lowlevel.checkpoint()
        events.append("task done")

    middleware = AfterResponseMiddleware(app_with_lifespan(events, effect))
    server_app = releasing_at_shutdown(middleware, release)
    async with serve_uvicorn(server_app) as url, httpx.AsyncClient(base_url=url) as client:
        for _ in range(3):
            await client.get("/")
        assert middleware.stats().running == 3
    assert events == ["task done", "task done", "task done", "app shutdown"]
    assert middleware.stats().succeeded == 3


async def test_shutdown_deadline_abandons_and_logs_each_task_by_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []
    started = anyio.Event()
    dead_letters: list[tuple[str, type[BaseException], int]] = []

    async def never_finishes() -> None:
        started.set()
        await anyio.sleep_forever()

    middleware = AfterResponseMiddleware(
        app_with_lifespan(events, never_finishes),
        shutdown_timeout=0.1,
        max_concurrency=1,
        on_dead_letter=lambda letter: dead_letters.append(
            (letter.task_name, type(letter.exception), letter.attempts)
        ),
    )
    caplog.set_level(logging.INFO, logger="after_response")
    with anyio.fail_after(10):
        async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
            await client.get("/")
            await client.get("/")  # queued behind the first: abandoned before it starts
            await started.wait()
    assert events == ["app shutdown"]
    stats = middleware.stats()
    assert (stats.abandoned, stats.running, stats.pending) == (2, 0, 0)
    messages = [r.getMessage() for r in caplog.records]
    assert any("2 after-response task(s) still unfinished" in m for m in messages)
    per_task = [r for r in caplog.records if "abandoned" in r.getMessage()]
    assert len(per_task) == 2
    assert {r.task_name for r in per_task} == {  # type: ignore[attr-defined]
        "test_shutdown_deadline_abandons_and_logs_each_task_by_name.<locals>.never_finishes"
    }
    assert [d[1] for d in dead_letters] == [TaskAbandonedError, TaskAbandonedError]


async def test_without_lifespan_tasks_still_run_and_a_warning_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[int] = []

    async def effect() -> None:
        ran.append(1)

    middleware = AfterResponseMiddleware(app_adding(effect))
    caplog.set_level(logging.WARNING, logger="after_response")
    async with serve_uvicorn(middleware, lifespan="off") as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for _ in range(3):
                assert (await client.get("/")).status_code == 200
        assert await middleware.drain(timeout=5)
    assert ran == [1, 1, 1]
    warnings = [r for r in caplog.records if "lifespan" in r.getMessage()]
    assert len(warnings) == 1


async def test_without_lifespan_the_response_still_leaves_before_the_task_ends() -> None:
    release = anyio.Event()

    async def blocked() -> None:
        await release.wait()

    middleware = AfterResponseMiddleware(app_adding(blocked))
    async with serve_uvicorn(middleware, lifespan="off") as url:
        async with httpx.AsyncClient(base_url=url) as client:
            with anyio.fail_after(5):
                assert (await client.get("/")).text == "ok"
        assert middleware.stats().running == 1
        release.set()
        assert await middleware.drain(timeout=5)


async def test_app_without_lifespan_support_gets_the_background_executor() -> None:
    """A bare ASGI app that raises on lifespan still gets a drain at shutdown."""
    events: list[str] = []
    release = anyio.Event()

    async def effect() -> None:
        await release.wait()  # still running when the server is asked to stop
        events.append("task done")

    async def bare_app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        assert scope["type"] == "http", "this app speaks HTTP only"
        from after_response import current

        current().add(effect)
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    middleware = AfterResponseMiddleware(bare_app)
    async with serve_uvicorn(releasing_at_shutdown(middleware, release), lifespan="on") as url:
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/")).text == "ok"
        assert middleware._executor.background is not None
    assert events == ["task done"]
