"""Failures stay isolated; failed requests discard their tasks unless asked otherwise."""

from __future__ import annotations

import logging
import threading

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from after_response import AfterResponseMiddleware, DeadLetter, Retry, TaskTimeoutError, side_effect

from .apps import app_adding
from .durable_process import until
from .servers import serve_uvicorn

pytestmark = pytest.mark.anyio

SECRET = "alice@example.com-token-8f3a"


async def test_failing_task_does_not_skip_the_others_nor_touch_the_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    async def first() -> None:
        ran.append("first")

    async def broken() -> None:
        raise ConnectionError("smtp down")

    def last() -> None:
        ran.append("last")

    middleware = AfterResponseMiddleware(app_adding(first, broken, last))
    caplog.set_level(logging.ERROR, logger="after_response")
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/")
        assert await middleware.drain(timeout=5)
        assert (await client.get("/")).status_code == 200  # the server is fine
        assert await middleware.drain(timeout=5)
    assert response.status_code == 200
    assert sorted(ran) == ["first", "first", "last", "last"]
    stats = middleware.stats()
    assert (stats.succeeded, stats.failed) == (4, 2)
    [record, _] = [r for r in caplog.records if "failed" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert record.error_type == "ConnectionError"  # type: ignore[attr-defined]
    assert record.exc_text.startswith("Traceback (most recent call last)")
    assert record.exc_text.endswith("ConnectionError: smtp down")
    assert (record.task_name, record.request_method, record.request_path) == (  # type: ignore[attr-defined]
        "test_failing_task_does_not_skip_the_others_nor_touch_the_response.<locals>.broken",
        "GET",
        "/",
    )


async def test_task_arguments_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    async def send_code(email: str, *, token: str) -> None:
        raise ConnectionError("smtp down")

    async def endpoint(request: Request) -> PlainTextResponse:
        request.state.after_response.options(retry=Retry(attempts=2, backoff=0)).add(
            send_code, SECRET, token=SECRET
        )
        request.state.after_response.options(timeout=0.01).add(anyio.sleep, 5)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(Starlette(routes=[Route("/", endpoint)]))
    caplog.set_level(logging.DEBUG, logger="after_response")
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
    assert middleware.stats().failed == 1
    assert middleware.stats().timed_out == 1
    assert caplog.records
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in repr(record.__dict__)
        assert SECRET not in caplog.text


@pytest.mark.parametrize(
    ("status", "raise_after"),
    [(500, False), (503, False), (200, True)],
    ids=["500", "503", "raise"],
)
async def test_failed_request_discards_its_tasks_with_a_log_line(
    status: int, raise_after: bool, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    async def email() -> None:
        ran.append("email")

    middleware = AfterResponseMiddleware(
        app_adding(email, email, status=status, raise_after=raise_after)
    )
    caplog.set_level(logging.WARNING, logger="after_response")
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/")
        assert await middleware.drain(timeout=5)
    assert response.status_code >= 500
    assert ran == []
    assert middleware.stats().discarded == 2
    lines = [r for r in caplog.records if " discarded " in r.getMessage()]
    # Repeated lines about one task name are aggregated: the first in full, then a count.
    [line] = lines
    assert line.task_name.rsplit(".", 1)[-1] == "email"  # type: ignore[attr-defined]
    assert line.getMessage().split(" of GET / ")[1].startswith("discarded (1 of 2 of this req")
    [summary] = [r for r in caplog.records if "more tasks of" in r.getMessage()]
    assert summary.aggregated_count == 1  # type: ignore[attr-defined]
    assert summary.getMessage().endswith(": discarded")


async def test_run_on_error_runs_tasks_of_failed_requests_globally_and_per_task() -> None:
    ran: list[str] = []

    @side_effect(run_on_error=True)
    async def alert() -> None:
        ran.append("alert")

    async def email() -> None:
        ran.append("email")

    per_task = AfterResponseMiddleware(app_adding(alert, email, status=500))
    everything = AfterResponseMiddleware(app_adding(alert, email, status=500), run_on_error=True)
    for middleware in (per_task, everything):
        async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
            await client.get("/")
            assert await middleware.drain(timeout=5)
    assert sorted(ran) == ["alert", "alert", "email"]
    assert per_task.stats().discarded == 1


async def test_4xx_responses_still_run_their_tasks() -> None:
    ran: list[str] = []

    async def audit() -> None:
        ran.append("audit")

    middleware = AfterResponseMiddleware(app_adding(audit, status=404))
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
    assert ran == ["audit"]


async def test_timed_out_task_is_cancelled_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cancelled: list[bool] = []
    dead: list[type[BaseException]] = []

    @side_effect(timeout=0.05)
    async def hangs() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.append(True)

    middleware = AfterResponseMiddleware(
        app_adding(hangs), on_dead_letter=lambda letter: dead.append(type(letter.exception))
    )
    caplog.set_level(logging.ERROR, logger="after_response")
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
    assert cancelled == [True]
    assert middleware.stats().timed_out == 1
    assert dead == [TaskTimeoutError]
    assert any("timed out after 0.05s" in r.getMessage() for r in caplog.records)


async def test_retries_follow_the_policy_then_dead_letter_the_last_failure() -> None:
    attempts: list[int] = []
    dead: list[tuple[str, str, int]] = []

    @side_effect(name="crm_sync", retry=Retry(attempts=3, backoff=0.01, jitter=0))
    async def crm_sync() -> None:
        attempts.append(len(attempts) + 1)
        raise ConnectionError("crm down")

    @side_effect(retry=Retry(attempts=3, backoff=0.01, retry_on=(ConnectionError,)))
    async def not_retried() -> None:
        raise ValueError("bad data is not worth retrying")

    middleware = AfterResponseMiddleware(
        app_adding(crm_sync, not_retried),
        on_dead_letter=lambda letter: dead.append(
            (letter.task_name, type(letter.exception).__name__, letter.attempts)
        ),
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
    assert attempts == [1, 2, 3]
    assert middleware.stats().retried == 2
    assert middleware.stats().failed == 2
    assert sorted(dead) == sorted(
        [
            ("crm_sync", "ConnectionError", 3),
            (
                "test_retries_follow_the_policy_then_dead_letter_the_last_failure.<locals>"
                ".not_retried",
                "ValueError",
                1,
            ),
        ]
    )


async def test_retry_on_given_as_a_list_retries_then_fails_and_is_counted() -> None:
    attempts: list[int] = []
    dead: list[int] = []

    @side_effect(retry=Retry(attempts=3, backoff=0.01, retry_on=[ConnectionError]))
    async def crm_sync() -> None:
        attempts.append(len(attempts) + 1)
        raise ConnectionError("crm down")

    middleware = AfterResponseMiddleware(
        app_adding(crm_sync), on_dead_letter=lambda letter: dead.append(letter.attempts)
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
    stats = middleware.stats()
    assert attempts == [1, 2, 3]
    assert (stats.retried, stats.failed, stats.pending, stats.running) == (2, 1, 0, 0)
    assert dead == [3]


async def test_retry_that_succeeds_counts_once_as_succeeded() -> None:
    calls = 0

    @side_effect(retry=Retry(attempts=5, backoff=0.001))
    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("try again")

    middleware = AfterResponseMiddleware(app_adding(flaky))
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
    stats = middleware.stats()
    assert (calls, stats.succeeded, stats.failed, stats.retried) == (3, 1, 0, 2)


async def test_a_task_waiting_to_retry_gives_its_slot_to_other_tasks() -> None:
    order: list[str] = []
    calls = 0

    @side_effect(retry=Retry(attempts=2, backoff=0.2, jitter=0))
    async def flaky() -> None:
        nonlocal calls
        calls += 1
        order.append(f"flaky {calls}")
        if calls == 1:
            raise ConnectionError("try again")

    async def other() -> None:
        order.append("other")

    middleware = AfterResponseMiddleware(app_adding(flaky, other), max_concurrency=1)
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
    assert order == ["flaky 1", "other", "flaky 2"]


async def test_a_dead_letter_hook_that_raises_is_logged_once_per_burst_and_not_propagated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A hook that always fails, under a burst of dead letters: its first traceback in full,
    # the others counted (no log storm), and nothing reaches the tasks or the server.
    async def broken() -> None:
        raise ValueError("x")

    def hook(letter: DeadLetter) -> None:
        raise RuntimeError("hook broke")

    middleware = AfterResponseMiddleware(app_adding(*[broken] * 20), on_dead_letter=hook)
    caplog.set_level(logging.ERROR, logger="after_response")
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
    # Shutdown waited for the hook's thread, then wrote the summary.
    hook_lines = [r for r in caplog.records if "on_dead_letter hook raised" in r.getMessage()]
    [full] = [r for r in hook_lines if not hasattr(r, "aggregated_count")]
    [summary] = [r for r in hook_lines if hasattr(r, "aggregated_count")]
    assert full.exc_text is not None
    assert "RuntimeError: hook broke" in full.exc_text
    assert summary.aggregated_count == 19  # type: ignore[attr-defined]
    assert summary.getMessage().endswith(": the on_dead_letter hook raised RuntimeError"), (
        summary.getMessage()
    )


@pytest.mark.parametrize("lifespan", ["on", "off"])
async def test_a_hooks_failures_counted_in_its_own_thread_are_summarised_while_the_server_runs(
    caplog: pytest.LogCaptureFixture, lifespan: str
) -> None:
    # The hook falls behind: its failures come in an interval of their own, after the tasks'
    # own lines were summarised. Counted in the hook's thread, which runs no event loop, they
    # are summarised by a timer on the server's loop, not only at the next line or shutdown.
    async def broken() -> None:
        raise ValueError("x")

    behind = threading.Event()

    def hook(letter: DeadLetter) -> None:
        behind.wait(10)
        raise RuntimeError("hook broke")

    def summaries(of: str) -> list[logging.LogRecord]:
        return [
            r for r in caplog.records if hasattr(r, "aggregated_count") and of in r.getMessage()
        ]

    middleware = AfterResponseMiddleware(
        app_adding(broken, broken, broken), on_dead_letter=hook, log_interval=0.2
    )
    caplog.set_level(logging.ERROR, logger="after_response")
    try:
        async with (
            serve_uvicorn(middleware, lifespan=lifespan) as url,
            httpx.AsyncClient(base_url=url) as client,
        ):
            await client.get("/")
            await until(lambda: summaries("failed (ValueError)"), 5, "the tasks' summary")
            behind.set()
            await until(lambda: summaries("hook raised"), 5, "the hook's summary, before shutdown")
    finally:
        behind.set()
    [summary] = summaries("hook raised")
    assert summary.aggregated_count == 2  # type: ignore[attr-defined]


async def test_a_downstream_that_is_down_writes_one_traceback_per_name_and_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every send fails (the SMTP server is down): the first failure of each name and error
    # type is written in full, with its traceback; the others are counted in one summary,
    # and so are the retries' lines. Each task is still counted and dead-lettered.
    async def send_email() -> None:
        raise ConnectionError("smtp down")

    async def timed_out() -> None:
        await anyio.sleep_forever()

    dead: list[str] = []
    retry_once = Retry(attempts=2, backoff=0.001, jitter=0)

    async def endpoint(request: Request) -> Response:
        collector = request.state.after_response
        for _ in range(10):
            collector.options(retry=retry_once).add(send_email)
            collector.options(name="crm", timeout=0.01, retry=retry_once).add(timed_out)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]),
        on_dead_letter=lambda letter: dead.append(letter.task_name),
    )
    caplog.set_level(logging.WARNING, logger="after_response")
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
    stats = middleware.stats()
    assert (stats.failed, stats.timed_out, stats.retried) == (10, 10, 20)
    assert len(dead) == 20

    def full(words: str) -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if words in r.getMessage() and not hasattr(r, "aggregated_count")
        ]

    def counted(reason: str) -> list[int]:
        return [
            r.aggregated_count  # type: ignore[attr-defined]
            for r in caplog.records
            if hasattr(r, "aggregated_count") and r.getMessage().endswith(f"s: {reason}")
        ]

    [failed] = full("failed after 2 attempt(s)")
    assert failed.exc_text is not None
    assert "ConnectionError: smtp down" in failed.exc_text
    assert counted("failed (ConnectionError)") == [9]
    assert len(full("attempt 1/2 failed (ConnectionError); retrying")) == 1
    assert counted("failed (ConnectionError); retrying") == [9]
    assert len(full("attempt 1/2 timed out (TaskTimeoutError); retrying")) == 1
    assert counted("timed out; retrying") == [9]
    assert len(full("timed out after 0.01s (attempt 2/2)")) == 1
    assert counted("timed out after 0.01s") == [9]


async def test_deadlines_apply_per_task_whatever_order_they_start_in() -> None:
    release = anyio.Event()
    outcomes: list[str] = []

    @side_effect(name="long", timeout=30)
    async def long_deadline() -> None:
        await release.wait()
        outcomes.append("long finished")

    @side_effect(name="short", timeout=0.05)
    async def short_deadline() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            outcomes.append("short cancelled")
            release.set()

    @side_effect(name="quick", timeout=0.01)
    async def finishes_in_time() -> None:
        outcomes.append("quick finished")

    # The long deadline starts first, so the watchdog must move its timer earlier for the
    # short one; the quick one ends before its deadline and must not be cancelled later.
    middleware = AfterResponseMiddleware(
        app_adding(long_deadline, finishes_in_time, short_deadline)
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
    stats = middleware.stats()
    assert (stats.succeeded, stats.timed_out) == (2, 1)
    assert sorted(outcomes) == ["long finished", "quick finished", "short cancelled"]


async def test_a_task_that_raises_its_own_timeout_error_failed_rather_than_timed_out() -> None:
    @side_effect(timeout=30)
    async def upstream_timeout() -> None:
        raise TimeoutError("the CRM did not answer")

    middleware = AfterResponseMiddleware(app_adding(upstream_timeout))
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
    assert (middleware.stats().failed, middleware.stats().timed_out) == (1, 0)


async def test_sync_task_past_its_deadline_is_abandoned_to_its_thread_and_counted() -> None:
    import threading

    unblock = threading.Event()

    @side_effect(timeout=0.05)
    def blocking_call() -> None:
        unblock.wait(5)

    middleware = AfterResponseMiddleware(app_adding(blocking_call))
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
        unblock.set()
    assert middleware.stats().timed_out == 1


async def test_timed_out_attempts_are_retried_when_the_policy_says_so() -> None:
    calls = 0

    @side_effect(timeout=0.05, retry=Retry(attempts=2, backoff=0))
    async def slow_then_fast() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await anyio.sleep_forever()

    middleware = AfterResponseMiddleware(app_adding(slow_then_fast))
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
    stats = middleware.stats()
    assert (calls, stats.succeeded, stats.retried, stats.timed_out) == (2, 1, 1, 0)
