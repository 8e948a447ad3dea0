"""The public API: one base exception, dead-letter records, task ids, current_task(), get()."""

from __future__ import annotations

import logging
import re
import threading

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import after_response
from after_response import (
    AfterResponseError,
    AfterResponseMiddleware,
    CurrentTask,
    DeadLetter,
    NoActiveRequestError,
    NoCurrentTaskError,
    Retry,
    TaskAbandonedError,
    TaskProcessDiedError,
    TaskShedError,
    TaskTimeoutError,
    current_task,
)

from .apps import app_adding
from .servers import serve_uvicorn

pytestmark = pytest.mark.anyio

TASK_ID = re.compile(r"[0-9a-f]{12}-[0-9a-f]+")


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (NoActiveRequestError, LookupError),
        (NoCurrentTaskError, LookupError),
        (TaskTimeoutError, TimeoutError),
        (TaskShedError, RuntimeError),
        (TaskAbandonedError, RuntimeError),
        (TaskProcessDiedError, RuntimeError),
    ],
)
def test_every_library_error_is_an_after_response_error_and_keeps_its_builtin_base(
    error: type[Exception], builtin: type[Exception]
) -> None:
    assert issubclass(error, AfterResponseError)
    assert issubclass(error, builtin)


def test_current_task_outside_a_side_effect_says_where_it_works() -> None:
    with pytest.raises(LookupError, match=r"only inside a running side effect") as info:
        current_task()
    assert isinstance(info.value, NoCurrentTaskError)


async def test_current_task_gives_an_id_stable_across_retries_and_the_attempt_number(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[CurrentTask] = []

    async def charge() -> None:
        seen.append(current_task())
        if sum(task.name.endswith("charge") for task in seen) < 3:
            raise ConnectionError("payment provider busy")

    def sync_receipt() -> None:  # in a worker thread: the same context
        seen.append(current_task())

    async def endpoint(request: Request) -> PlainTextResponse:
        collector = request.state.after_response
        collector.options(retry=Retry(attempts=3, backoff=0.001)).add(charge)
        collector.add(sync_receipt)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(Starlette(routes=[Route("/", endpoint)]))
    caplog.set_level(logging.DEBUG, logger="after_response")
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
    charges = [task for task in seen if task.name.endswith("charge")]
    [receipt] = [task for task in seen if task.name.endswith("sync_receipt")]
    assert [task.attempt for task in charges] == [1, 2, 3]
    assert len({task.id for task in charges}) == 1
    assert charges[0].id != receipt.id
    assert all(TASK_ID.fullmatch(task.id) for task in seen)
    assert not any(task.recovered for task in seen)
    logged_ids = {getattr(r, "task_id", None) for r in caplog.records if hasattr(r, "task_id")}
    assert charges[0].id in logged_ids
    assert any(charges[0].id in r.getMessage() for r in caplog.records)


async def test_dead_letter_hook_receives_one_record_per_failed_task() -> None:
    letters: list[DeadLetter] = []
    hook_threads: set[str] = set()

    async def fail() -> None:
        raise ValueError("bad")

    def hook(letter: DeadLetter) -> None:
        hook_threads.add(threading.current_thread().name)
        letters.append(letter)

    middleware = AfterResponseMiddleware(
        app_adding(fail),
        retry=Retry(attempts=2, backoff=0.001),
        on_dead_letter=hook,
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)  # also waits for the hook
    [letter] = letters
    assert letter.task_name.endswith("fail")
    assert TASK_ID.fullmatch(letter.task_id)
    assert isinstance(letter.exception, ValueError)
    assert (letter.attempts, letter.outcome) == (2, "failed")
    assert hook_threads == {"after-response-dead-letters"}  # never on the event loop


def test_async_dead_letter_hook_is_rejected_at_construction() -> None:
    async def hook(letter: DeadLetter) -> None:
        pass

    with pytest.raises(TypeError, match=r"plain \(def\) function.*run_coroutine_threadsafe"):
        AfterResponseMiddleware(app_adding(), on_dead_letter=hook)


def test_get_returns_the_collector_or_says_how_to_install_the_middleware() -> None:
    found: list[object] = []

    async def endpoint(request: Request) -> PlainTextResponse:
        found.append(after_response.get(request))
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    with TestClient(AfterResponseMiddleware(app)) as client:
        client.get("/")
    assert isinstance(found[0], after_response.Collector)

    bare = TestClient(app, raise_server_exceptions=True)
    with pytest.raises(
        NoActiveRequestError, match=r"app.add_middleware\(AfterResponseMiddleware\)"
    ):
        bare.get("/")


async def test_logged_tracebacks_redact_messages_but_keep_file_names_and_source_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The arguments are words that also appear in this file's path and source line.
    async def fanout(event: str, kind: str) -> None:
        raise ValueError(f"cannot deliver {event} of kind {kind}")

    async def endpoint(request: Request) -> PlainTextResponse:
        request.state.after_response.add(fanout, "tests", "deliver")
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(Starlette(routes=[Route("/", endpoint)]))
    caplog.set_level(logging.ERROR, logger="after_response")
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
    [record] = [r for r in caplog.records if "failed after" in r.getMessage()]
    text = record.exc_text or ""
    assert "tests/test_api.py" in text  # the file name, although "tests" was an argument
    assert 'raise ValueError(f"cannot deliver {event} of kind {kind}")' in text
    assert text.rstrip().endswith("ValueError: cannot [redacted] [redacted] of kind [redacted]")


def test_an_exception_whose_str_raises_is_still_logged_and_redacted() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    from after_response._redact import redacted_exception

    message, stacktrace = redacted_exception(Unprintable(), ["secret-value"])
    assert "Unprintable" in message
    assert "Unprintable" in stacktrace
