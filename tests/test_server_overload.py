"""Overload: pending work stays bounded; what does not fit is shed, logged and counted."""

from __future__ import annotations

import logging
import threading

import anyio
import httpx
import pytest

from after_response import AfterResponseMiddleware, DeadLetter, TaskShedError

from .apps import app_adding
from .servers import serve_uvicorn

pytestmark = pytest.mark.anyio


async def test_full_queue_makes_requests_wait_then_sheds_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = anyio.Event()
    shed: list[str] = []
    both_shed = threading.Event()

    def dead_letter(letter: DeadLetter) -> None:  # runs in the hook's own thread
        shed.append(type(letter.exception).__name__)
        if len(shed) == 2:
            both_shed.set()

    async def blocked() -> None:
        await release.wait()

    middleware = AfterResponseMiddleware(
        app_adding(blocked),
        max_concurrency=1,
        max_pending=2,
        overflow_timeout=0.2,
        on_dead_letter=dead_letter,
    )
    caplog.set_level(logging.ERROR, logger="after_response")
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(client.get, "/")
        # Every client had its response; 1 task runs, 2 wait in the queue, 2 wait for room.
        assert middleware.stats().pending <= 2
        assert await anyio.to_thread.run_sync(both_shed.wait, 5)
        stats = middleware.stats()
        assert (stats.running, stats.pending, stats.shed, stats.collected) == (1, 2, 2, 0)
        release.set()
        assert await middleware.drain(timeout=5)
    stats = middleware.stats()
    assert (stats.succeeded, stats.shed, stats.added) == (3, 2, 5)
    assert shed == [TaskShedError.__name__] * 2
    assert sum("shed" in r.getMessage() for r in caplog.records) == 2


async def test_room_freed_in_time_admits_waiting_tasks_instead_of_shedding() -> None:
    release = anyio.Event()

    async def blocked() -> None:
        await release.wait()

    middleware = AfterResponseMiddleware(
        app_adding(blocked), max_concurrency=1, max_pending=1, overflow_timeout=10
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(client.get, "/")
        # The third request's call holds its task, waiting for room (its client already
        # has its response).
        stats = middleware.stats()
        assert (stats.running, stats.pending, stats.collected) == (1, 1, 1)
        release.set()
        assert await middleware.drain(timeout=5)
    assert (middleware.stats().succeeded, middleware.stats().shed) == (3, 0)


async def test_waiting_requests_are_bounded_too_beyond_which_tasks_shed_at_once() -> None:
    release = anyio.Event()

    async def blocked() -> None:
        await release.wait()

    # Two tasks per request; room for 1 running + 2 queued + 2 waiting.
    middleware = AfterResponseMiddleware(
        app_adding(blocked, blocked), max_concurrency=1, max_pending=2, overflow_timeout=30
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(client.get, "/")
        stats = middleware.stats()
        assert stats.running + stats.pending <= 3
        assert stats.shed >= 1  # the third request's pair found every waiting place taken
        release.set()
        assert await middleware.drain(timeout=5)
    stats = middleware.stats()
    assert stats.added == stats.succeeded + stats.shed == 6
