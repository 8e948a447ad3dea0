"""The global concurrency bound is exact, under a real server."""

from __future__ import annotations

import anyio
import httpx
import pytest

from after_response import AfterResponseMiddleware

from .apps import app_adding
from .servers import serve_uvicorn

pytestmark = pytest.mark.anyio


async def test_concurrency_bound_is_reached_and_never_exceeded() -> None:
    limit, requests = 3, 10
    release = anyio.Event()
    limit_reached = anyio.Event()
    running = peak = 0

    async def effect() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == limit:
            limit_reached.set()
        await release.wait()
        running -= 1

    middleware = AfterResponseMiddleware(app_adding(effect), max_concurrency=limit)
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        async with anyio.create_task_group() as tg:
            for _ in range(requests):
                tg.start_soon(client.get, "/")
        with anyio.fail_after(5):
            await limit_reached.wait()
        stats = middleware.stats()
        assert (stats.running, stats.pending) == (limit, requests - limit)
        release.set()
        assert await middleware.drain(timeout=5)
    assert peak == limit
    assert middleware.stats().succeeded == requests


async def test_tasks_of_one_request_run_concurrently() -> None:
    started = 0
    all_started = anyio.Event()

    async def effect() -> None:
        nonlocal started
        started += 1
        if started == 4:
            all_started.set()
        # Each waits for all four: only concurrent execution can finish.
        await all_started.wait()

    middleware = AfterResponseMiddleware(app_adding(effect, effect, effect, effect))
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
    assert middleware.stats().succeeded == 4


async def test_sync_side_effects_run_in_worker_threads_not_on_the_loop() -> None:
    import threading

    loop_thread = threading.get_ident()
    threads: list[int] = []

    def blocking_effect() -> None:
        threads.append(threading.get_ident())

    middleware = AfterResponseMiddleware(app_adding(blocking_effect))
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
    assert len(threads) == 1
    assert threads[0] != loop_thread
