"""Each log line about a task names the task and its request, and links to its trace.

Records are captured with ``caplog`` from the ``after_response`` logger; tracing uses an
explicit SDK provider (never the global one) with the ASGI instrumentation outermost.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from after_response import AfterResponseMiddleware, DeadLetter, Retry

from .durable_process import until
from .servers import serve_uvicorn

pytestmark = pytest.mark.anyio

PATH = "/orders/42"
EXTRA_FIELDS = ("task_name", "request_method", "request_path")


def task_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The after_response records about a task (startup notices have no task)."""
    return [r for r in caplog.records if r.name == "after_response" and hasattr(r, "task_name")]


def what(record: logging.LogRecord) -> str:
    """Which kind of line this is."""
    message = record.getMessage()
    return next(w for w in ("on_dead_letter", "discarded", "abandoned", "shed") if w in message)


def field(record: logging.LogRecord, name: str) -> Any:
    return record.__dict__.get(name)


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


def server_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    [span] = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    return span


def attempt_span(exporter: InMemorySpanExporter, task: str, attempt: int) -> ReadableSpan:
    [span] = [
        s
        for s in exporter.get_finished_spans()
        if (s.attributes or {}).get("after_response.task.name") == task
        and (s.attributes or {}).get("after_response.task.attempt") == attempt
    ]
    return span


async def test_attempt_log_lines_carry_the_task_the_request_and_the_attempt_span(
    caplog: pytest.LogCaptureFixture,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
) -> None:
    calls = 0

    async def fail() -> None:
        raise ConnectionError("smtp down")

    async def slow() -> None:
        await anyio.sleep_forever()

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("once")

    async def endpoint(request: Request) -> PlainTextResponse:
        collector = request.state.after_response
        collector.options(name="fail").add(fail)
        collector.options(name="slow", timeout=0.05).add(slow)
        collector.options(name="flaky", retry=Retry(attempts=2, backoff=0, jitter=0)).add(flaky)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route(PATH, endpoint, methods=["POST"])]),
        tracer_provider=tracer_provider,
    )
    app = OpenTelemetryMiddleware(middleware, tracer_provider=tracer_provider)
    caplog.set_level(logging.DEBUG, logger="after_response")
    async with serve_uvicorn(app) as url, httpx.AsyncClient(base_url=url) as client:
        await client.post(PATH)
        assert await middleware.drain(timeout=10)

    trace_id, _ = hex_ids(server_span(exporter))
    by_task = {field(r, "task_name"): r for r in task_records(caplog)}
    assert set(by_task) == {"fail", "slow", "flaky"}
    expected = {
        "fail": (logging.ERROR, True, attempt_span(exporter, "fail", 1)),
        "slow": (logging.ERROR, False, attempt_span(exporter, "slow", 1)),
        "flaky": (logging.WARNING, False, attempt_span(exporter, "flaky", 1)),
    }
    for task, (level, has_traceback, span) in expected.items():
        record = by_task[task]
        assert record.levelno == level, task
        assert bool(record.exc_text) is has_traceback, task
        assert (field(record, "request_method"), field(record, "request_path")) == ("POST", PATH)
        assert (field(record, "trace_id"), field(record, "span_id")) == (
            trace_id,
            hex_ids(span)[1],
        ), task
    assert "failed after 1 attempt(s)" in by_task["fail"].getMessage()
    assert "timed out after 0.05s" in by_task["slow"].getMessage()
    assert "attempt 1/2 failed (ConnectionError); retrying" in by_task["flaky"].getMessage()


async def test_log_lines_of_tasks_that_never_ran_carry_the_request_and_its_trace(
    caplog: pytest.LogCaptureFixture,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
) -> None:
    """Discarded (5xx), shed, abandoned (queued and running) tasks, and a dead-letter hook
    that raises: every line names the task and its request and carries the request's trace
    (the span id is the span that was current when the task was added)."""
    started = anyio.Event()

    async def running() -> None:
        started.set()
        await anyio.sleep_forever()

    async def never() -> None:
        raise AssertionError("never starts")

    def broken_hook(letter: DeadLetter) -> None:
        raise RuntimeError("dead-letter queue unreachable")

    async def endpoint(request: Request) -> PlainTextResponse:
        collector = request.state.after_response
        if request.method == "DELETE":
            collector.options(name="refund").add(never)
            return PlainTextResponse("failed", status_code=500)
        collector.options(name="invoice").add(running)
        collector.options(name="receipt").add(never)
        collector.options(name="survey").add(never)  # no room: max_pending=1 is taken
        collector.options(name="survey").add(never)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route(PATH, endpoint, methods=["POST", "DELETE"])]),
        tracer_provider=tracer_provider,
        max_concurrency=1,
        max_pending=1,
        shutdown_timeout=0.05,
        task_timeout=None,
        on_dead_letter=broken_hook,
    )
    app = OpenTelemetryMiddleware(middleware, tracer_provider=tracer_provider)
    caplog.set_level(logging.DEBUG, logger="after_response")
    async with serve_uvicorn(app) as url, httpx.AsyncClient(base_url=url) as client:
        await client.delete(PATH)
        await client.post(PATH)
        await started.wait()

    servers = {
        (s.attributes or {}).get("http.method"): hex_ids(s)
        for s in exporter.get_finished_spans()
        if s.kind is SpanKind.SERVER
    }
    lines = task_records(caplog)
    assert sorted((field(r, "task_name"), r.levelname, what(r)) for r in lines) == [
        ("invoice", "ERROR", "abandoned"),
        ("invoice", "ERROR", "on_dead_letter"),
        ("receipt", "ERROR", "abandoned"),
        ("receipt", "ERROR", "on_dead_letter"),
        ("refund", "WARNING", "discarded"),
        ("survey", "ERROR", "on_dead_letter"),
        ("survey", "ERROR", "on_dead_letter"),
        ("survey", "ERROR", "shed"),
        ("survey", "ERROR", "shed"),
    ]
    for record in lines:
        method = "DELETE" if field(record, "task_name") == "refund" else "POST"
        assert (field(record, "request_method"), field(record, "request_path")) == (method, PATH)
        assert (field(record, "trace_id"), field(record, "span_id")) == servers[method]


async def test_without_any_span_log_lines_have_no_trace_fields(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)  # undo any other test's global SDK

    async def fail() -> None:
        raise ConnectionError("smtp down")

    async def endpoint(request: Request) -> PlainTextResponse:
        request.state.after_response.options(name="fail").add(fail)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(Starlette(routes=[Route(PATH, endpoint)]))
    caplog.set_level(logging.DEBUG, logger="after_response")
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get(PATH)
        assert await middleware.drain(timeout=10)

    [record] = task_records(caplog)
    assert {name: field(record, name) for name in EXTRA_FIELDS} == {
        "task_name": "fail",
        "request_method": "GET",
        "request_path": PATH,
    }
    assert not hasattr(record, "trace_id")
    assert not hasattr(record, "span_id")


async def test_log_lines_link_to_the_request_trace_even_with_the_middleware_untraced(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
) -> None:
    """The middleware makes no spans (no provider of its own, no global SDK), but the
    server span opened outside it is current when the task is added: the line links to it."""
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)

    async def fail() -> None:
        raise ConnectionError("smtp down")

    async def endpoint(request: Request) -> PlainTextResponse:
        request.state.after_response.options(name="fail").add(fail)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(Starlette(routes=[Route(PATH, endpoint)]))
    app = OpenTelemetryMiddleware(middleware, tracer_provider=tracer_provider)
    caplog.set_level(logging.DEBUG, logger="after_response")
    async with serve_uvicorn(app) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get(PATH)
        assert await middleware.drain(timeout=10)

    [record] = task_records(caplog)
    assert (field(record, "trace_id"), field(record, "span_id")) == hex_ids(server_span(exporter))


async def test_tasks_shed_together_write_one_line_per_name_and_count_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request's tasks that find no room are shed at once: the first of each name is
    written in full (with its task id), the others of that name are counted in a summary."""
    release = anyio.Event()

    async def blocked() -> None:
        await release.wait()

    async def endpoint(request: Request) -> PlainTextResponse:
        collector = request.state.after_response
        collector.options(name="invoice").add(blocked)  # runs
        collector.options(name="invoice").add(blocked)  # queued: max_pending=1
        for name in ("email", "email", "crm", "email", "crm"):  # one waits, 4 shed together
            collector.options(name=name).add(blocked)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route(PATH, endpoint)]),
        max_concurrency=1,
        max_pending=1,
    )
    caplog.set_level(logging.DEBUG, logger="after_response")
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get(PATH)
        await until(lambda: middleware.stats().shed >= 4, 5, "four side effects shed")
        release.set()
    shed = [r for r in task_records(caplog) if what(r) == "shed"]
    full = {field(r, "task_name"): r for r in shed if not hasattr(r, "aggregated_count")}
    summaries = {field(r, "task_name"): r for r in shed if hasattr(r, "aggregated_count")}
    assert sorted(full) == ["crm", "email"]
    assert all(field(r, "task_id") for r in full.values())
    assert {name: field(r, "aggregated_count") for name, r in summaries.items()} == {
        "crm": 1,
        "email": 1,
    }
    assert middleware.stats().shed == 4  # the one that waited ran once there was room
