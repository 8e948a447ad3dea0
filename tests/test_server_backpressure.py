"""overflow="backpressure": new requests wait for room before their handler runs, so a
flood of keep-alive clients is slowed down and no side effect is shed; past
admission_timeout a request is answered 503 with Retry-After; exempt paths never wait."""

from __future__ import annotations

import logging

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from after_response import AfterResponseMiddleware

from .servers import SERVERS

pytestmark = [pytest.mark.anyio, pytest.mark.server]

CLIENTS = 6
REQUESTS = 15
TASKS_PER_REQUEST = 4


def flood_app(effect: object, handled: list[str]) -> Starlette:
    async def work(request: Request) -> PlainTextResponse:
        handled.append(request.url.path)
        for _ in range(TASKS_PER_REQUEST):
            request.state.after_response.add(effect)
        return PlainTextResponse("ok")

    async def health(request: Request) -> PlainTextResponse:
        handled.append(request.url.path)
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/work", work), Route("/health", health)])


@pytest.mark.parametrize("server", sorted(SERVERS))
async def test_a_keep_alive_flood_is_slowed_down_and_nothing_is_shed(server: str) -> None:
    ran = 0
    peak_pending = 0

    async def effect() -> None:
        nonlocal ran
        await anyio.sleep(0.005)
        ran += 1

    handled: list[str] = []
    middleware = AfterResponseMiddleware(
        flood_app(effect, handled),
        max_concurrency=4,
        max_pending=8,
        overflow="backpressure",
        admission_timeout=30,
    )

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal peak_pending
        for _ in range(REQUESTS):
            response = await client.get("/work")
            assert response.status_code == 200
            peak_pending = max(peak_pending, middleware.stats().pending)

    async with SERVERS[server](middleware) as url:
        async with anyio.create_task_group() as task_group:
            for _ in range(CLIENTS):
                client = httpx.AsyncClient(base_url=url)  # one keep-alive connection each
                task_group.start_soon(client_loop, client)
        assert await middleware.drain(timeout=30)
    stats = middleware.stats()
    total = CLIENTS * REQUESTS * TASKS_PER_REQUEST
    assert (stats.added, stats.succeeded, stats.shed) == (total, total, 0)
    assert ran == total
    assert middleware._executor.held > 0  # requests were held: the producers slowed down
    # Bounded: the queue, plus the tasks of the requests already past the gate.
    assert peak_pending <= 8 + CLIENTS * TASKS_PER_REQUEST


async def test_a_request_held_past_admission_timeout_gets_503_and_exempt_paths_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = anyio.Event()

    async def blocked() -> None:
        await release.wait()

    handled: list[str] = []
    middleware = AfterResponseMiddleware(
        flood_app(blocked, handled),
        max_concurrency=1,
        max_pending=3,
        overflow="backpressure",
        admission_timeout=0.2,
        exempt_paths=["/health"],
    )
    async with SERVERS["uvicorn"](middleware) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/work")).status_code == 200  # 1 runs, 3 queued: full
        caplog.set_level(logging.WARNING, logger="after_response")
        busy = [await client.get("/work") for _ in range(3)]
        assert [response.status_code for response in busy] == [503] * 3
        assert busy[0].headers["retry-after"] == "1"
        assert handled == ["/work"]  # the held requests' handlers never ran
        health = await client.get("/health")
        assert health.status_code == 200
        release.set()
        assert await middleware.drain(timeout=5)
        assert (await client.get("/work")).status_code == 200  # room again
        assert await middleware.drain(timeout=5)
    assert middleware.stats().shed == 0
    assert middleware._executor.refused == 3
    # One line in full, the others counted: under a flood every request is refused alike.
    refusals = [r.getMessage() for r in caplog.records if "503" in r.getMessage()]
    assert len(refusals) == 2, refusals
    assert refusals[0].startswith("backpressure: GET /work answered 503 after waiting")
    assert refusals[1].startswith("... and 2 more 503 responses from backpressure in the last ")


def test_bad_overflow_settings_fail_at_construction() -> None:
    app = Starlette()
    with pytest.raises(ValueError, match="overflow must be one of 'shed', 'backpressure'"):
        AfterResponseMiddleware(app, overflow="drop")
    with pytest.raises(TypeError, match="exempt_paths must be a collection of paths"):
        AfterResponseMiddleware(app, overflow="backpressure", exempt_paths="/health")
    with pytest.raises(TypeError, match="pass store=SQLiteStore"):
        AfterResponseMiddleware(app, overflow="spill")
    with pytest.raises(TypeError, match="admission_timeout must be a positive number"):
        AfterResponseMiddleware(app, overflow="backpressure", admission_timeout=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loop_block_threshold must be a positive number"):
        AfterResponseMiddleware(app, loop_block_threshold=0)
    with pytest.raises(TypeError, match="log_interval must be a positive number"):
        AfterResponseMiddleware(app, log_interval=None)  # type: ignore[arg-type]


async def test_shed_under_a_keep_alive_flood_keeps_memory_bounded_and_every_task_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """overflow="shed" (the default), honestly: the clients are not slowed down, what does not
    fit is shed, and every task still ends in exactly one counted state, with few log lines."""
    import logging

    async def effect() -> None:
        await anyio.sleep(0.005)

    handled: list[str] = []
    middleware = AfterResponseMiddleware(
        flood_app(effect, handled), max_concurrency=2, max_pending=4, overflow_timeout=0.05
    )
    peak_pending = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal peak_pending
        for _ in range(REQUESTS):
            assert (await client.get("/work")).status_code == 200
            peak_pending = max(peak_pending, middleware.stats().pending)

    caplog.set_level(logging.ERROR, logger="after_response")
    async with SERVERS["uvicorn"](middleware) as url:
        async with anyio.create_task_group() as task_group:
            for _ in range(CLIENTS):
                task_group.start_soon(client_loop, httpx.AsyncClient(base_url=url))
        assert await middleware.drain(timeout=30)
    stats = middleware.stats()
    total = CLIENTS * REQUESTS * TASKS_PER_REQUEST
    assert stats.added == total == stats.succeeded + stats.shed
    assert stats.shed > 0  # the flood did not fit, and was not slowed down
    assert middleware._executor.held == 0
    assert peak_pending <= 4
    assert len([r for r in caplog.records if r.name == "after_response"]) <= 4
