"""Every side effect is a span in its request's trace: parented, attributed, one per attempt.

Providers are passed explicitly (never set globally): the SDK's in-memory exporter behind a
``SimpleSpanProcessor``, the OpenTelemetry server middleware outside the after-response one,
the app under uvicorn on 127.0.0.1, and ``drain()`` before reading the spans.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import smtplib
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware as AsgiInstrumentation
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider, SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.middleware.opentelemetry import OpenTelemetryMiddleware as StarletteTelemetry
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

import after_response
from after_response import AfterResponseMiddleware, Retry
from after_response.fastapi import AfterResponse

from .servers import serve_uvicorn

pytestmark = pytest.mark.anyio

EMAIL = "ada.lovelace@example.com"
TOKEN = "tok_5f2b9c7e1d"


#: The server-span middlewares users put outermost, built with an explicit provider.
OUTER: dict[str, Callable[[ASGIApp, TracerProvider], ASGIApp]] = {
    "opentelemetry-instrumentation-asgi": lambda app, provider: AsgiInstrumentation(
        app, tracer_provider=provider, meter_provider=NoOpMeterProvider()
    ),
    "starlette": lambda app, provider: StarletteTelemetry(
        app, tracer_provider=provider, meter_provider=NoOpMeterProvider()
    ),
}


def app_with(
    endpoint: Callable[[Request], Any], path: str = "/", methods: tuple[str, ...] = ("GET",)
) -> Starlette:
    async def handle(request: Request) -> Response:
        result = endpoint(request)
        if isinstance(result, Response):
            return result
        return PlainTextResponse("ok")

    return Starlette(routes=[Route(path, handle, methods=list(methods))])


def adding(*effects: Callable[..., Any], status: int = 200) -> Starlette:
    """GET / adds each effect (no arguments) and answers ``status``."""

    def endpoint(request: Request) -> Response:
        for effect in effects:
            request.state.after_response.add(effect)
        return PlainTextResponse("ok", status_code=status)

    return app_with(endpoint)


async def get_and_drain(
    middleware: AfterResponseMiddleware, app: ASGIApp, *paths: str, lifespan: str = "on"
) -> None:
    async with serve_uvicorn(app, lifespan=lifespan) as url, httpx.AsyncClient(base_url=url) as c:
        for path in paths or ("/",):
            await c.get(path)
            assert await middleware.drain(timeout=10)


def effect_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith("after_response ")]


def only(spans: list[ReadableSpan], kind: SpanKind) -> ReadableSpan:
    [span] = [s for s in spans if s.kind is kind]
    return span


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


def span_name(fn: Callable[..., Any]) -> str:
    """The span name of a task added without a name: its function's qualified name."""
    return f"after_response {fn.__qualname__}"


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


# -- trace structure -----------------------------------------------------------------------------


@pytest.mark.parametrize("lifespan", ["on", "off"])
@pytest.mark.parametrize("outer", list(OUTER))
async def test_side_effect_span_is_a_child_of_the_server_span_in_its_trace(
    outer: str, lifespan: str, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    async def send_email() -> None:
        pass

    middleware = AfterResponseMiddleware(adding(send_email), tracer_provider=tracer_provider)
    app = OUTER[outer](middleware, tracer_provider)
    await get_and_drain(middleware, app, "/", lifespan=lifespan)

    server = only(list(exporter.get_finished_spans()), SpanKind.SERVER)
    [effect] = effect_spans(exporter)
    server_trace, server_id = ids(server)
    assert effect.name == span_name(send_email)
    assert effect.kind is SpanKind.INTERNAL
    assert ids(effect)[0] == server_trace
    assert parent_id(effect) == server_id


async def test_parentage_holds_with_the_instrumentation_inside_the_middleware_too(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    """Outermost is recommended (the server span then covers the whole request call), but the
    span is current in the handler either way, and add() is what decides the parent."""

    async def send_email() -> None:
        pass

    instrumented = AsgiInstrumentation(adding(send_email), tracer_provider=tracer_provider)
    middleware = AfterResponseMiddleware(instrumented, tracer_provider=tracer_provider)
    await get_and_drain(middleware, middleware)

    server = only(list(exporter.get_finished_spans()), SpanKind.SERVER)
    [effect] = effect_spans(exporter)
    assert ids(effect)[0] == ids(server)[0]
    assert parent_id(effect) == ids(server)[1]


async def test_with_fastapis_own_telemetry_the_side_effect_span_descends_from_its_server_span(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    """FastAPI 0.165+ opens a server span and operation spans itself (``FastAPI(telemetry=...)``):
    the side effect's span hangs under the span current at ``add()``, in the request's trace."""
    pytest.importorskip("fastapi.telemetry")

    async def send_email() -> None:
        pass

    api = FastAPI(telemetry={"tracer_provider": tracer_provider, "metrics": False, "logs": False})

    @api.get("/")
    async def login(after: AfterResponse) -> dict[str, str]:
        after.add(send_email)
        return {"message": "Code sent"}

    middleware = AfterResponseMiddleware(api, tracer_provider=tracer_provider)
    await get_and_drain(middleware, middleware)

    spans = {ids(s)[1]: s for s in exporter.get_finished_spans()}
    server = only(list(spans.values()), SpanKind.SERVER)
    [effect] = effect_spans(exporter)
    ancestors = []
    parent = parent_id(effect)
    while parent is not None:
        ancestors.append(parent)
        parent = parent_id(spans[parent])
    assert ids(effect)[0] == ids(server)[0]
    assert ancestors[-1] == ids(server)[1]


@pytest.mark.parametrize("lifespan", ["on", "off"])
async def test_side_effect_span_starts_after_the_response_was_sent(
    lifespan: str, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    """The instrumentation's "http send" span of the final body ends before the side effect's
    span starts (causal order, not timing: the task is handed over once that send returned)."""

    async def send_email() -> None:
        pass

    middleware = AfterResponseMiddleware(adding(send_email), tracer_provider=tracer_provider)
    app = AsgiInstrumentation(middleware, tracer_provider=tracer_provider)
    await get_and_drain(middleware, app, "/", lifespan=lifespan)

    spans = list(exporter.get_finished_spans())
    [body_sent] = [s for s in spans if attrs(s).get("asgi.event.type") == "http.response.body"]
    [effect] = effect_spans(exporter)
    assert body_sent.end_time is not None
    assert effect.start_time is not None
    assert effect.start_time >= body_sent.end_time
    # This instrumentation ends its server span with the final body, so the side effect's
    # span also starts after its parent ended (Starlette's middleware ends it later).
    server = only(spans, SpanKind.SERVER)
    assert server.end_time is not None
    assert effect.start_time >= server.end_time


async def test_side_effect_span_is_a_child_of_the_span_the_handler_opened_around_add(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    tracer = tracer_provider.get_tracer("handler")

    async def send_email() -> None:
        pass

    def endpoint(request: Request) -> None:
        with tracer.start_as_current_span("create user"):
            request.state.after_response.add(send_email)

    middleware = AfterResponseMiddleware(app_with(endpoint), tracer_provider=tracer_provider)
    app = AsgiInstrumentation(middleware, tracer_provider=tracer_provider)
    await get_and_drain(middleware, app, "/")

    spans = list(exporter.get_finished_spans())
    [handler_span] = [s for s in spans if s.name == "create user"]
    [effect] = effect_spans(exporter)
    assert ids(effect)[0] == ids(handler_span)[0] == ids(only(spans, SpanKind.SERVER))[0]
    assert parent_id(effect) == ids(handler_span)[1]


async def test_spans_opened_inside_side_effects_nest_under_their_span(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    """Async side effects run on the loop, sync ones in a worker thread: both see their span
    as the current one, so a client span they open (SMTP, HTTP) is its child."""
    tracer = tracer_provider.get_tracer("effects")

    async def notify() -> None:
        with tracer.start_as_current_span("http post", kind=SpanKind.CLIENT):
            pass

    def send_email() -> None:
        with tracer.start_as_current_span("smtp send", kind=SpanKind.CLIENT):
            pass

    middleware = AfterResponseMiddleware(
        adding(notify, send_email), tracer_provider=tracer_provider
    )
    await get_and_drain(
        middleware, AsgiInstrumentation(middleware, tracer_provider=tracer_provider)
    )

    by_name = {s.name: s for s in exporter.get_finished_spans()}
    assert parent_id(by_name["http post"]) == ids(by_name[span_name(notify)])[1]
    assert parent_id(by_name["smtp send"]) == ids(by_name[span_name(send_email)])[1]


async def test_each_request_gets_its_own_trace(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    async def send_email() -> None:
        pass

    middleware = AfterResponseMiddleware(adding(send_email), tracer_provider=tracer_provider)
    app = AsgiInstrumentation(middleware, tracer_provider=tracer_provider)
    await get_and_drain(middleware, app, "/", "/")

    servers = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    effects = effect_spans(exporter)
    assert len(servers) == len(effects) == 2
    assert {(ids(s)[0], ids(s)[1]) for s in servers} == {(ids(e)[0], parent_id(e)) for e in effects}


# -- attributes ----------------------------------------------------------------------------------


async def test_succeeded_span_carries_the_task_attributes(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    async def send_email() -> None:
        pass

    middleware = AfterResponseMiddleware(adding(send_email), tracer_provider=tracer_provider)
    await get_and_drain(middleware, middleware)

    [span] = effect_spans(exporter)
    attributes = attrs(span)
    queue_duration = attributes.pop("after_response.task.queue_duration")
    task_id = attributes.pop("after_response.task.id")
    assert isinstance(task_id, str)
    assert re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", task_id)
    assert attributes == {
        "after_response.task.name": send_email.__qualname__,
        "code.function.name": f"{send_email.__module__}.{send_email.__qualname__}",
        "after_response.task.attempt": 1,
        "after_response.task.outcome": "succeeded",
    }
    assert isinstance(queue_duration, float)
    assert queue_duration >= 0
    assert span.kind is SpanKind.INTERNAL
    assert span.status.status_code is StatusCode.UNSET
    assert span.events == ()
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "after_response"
    assert span.instrumentation_scope.version == after_response.__version__


async def test_span_name_is_the_task_name_given_by_options_or_the_decorator(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    @after_response.side_effect(name="welcome-email")
    async def send_welcome() -> None:
        pass

    class Mailer:
        def send(self) -> None:
            pass

    def endpoint(request: Request) -> None:
        collector = request.state.after_response
        collector.add(send_welcome)
        collector.options(name="verification-email").add(Mailer().send)
        collector.add(functools.partial(Mailer.send, Mailer()))

    middleware = AfterResponseMiddleware(app_with(endpoint), tracer_provider=tracer_provider)
    await get_and_drain(middleware, middleware)

    names = {s.name: attrs(s)["code.function.name"] for s in effect_spans(exporter)}
    qualified = f"{Mailer.__module__}.{Mailer.send.__qualname__}"
    assert names == {
        "after_response welcome-email": f"{send_welcome.__module__}.{send_welcome.__qualname__}",
        "after_response verification-email": qualified,
        span_name(Mailer.send): qualified,
    }


async def test_failing_task_span_has_error_status_exception_event_and_error_type(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    async def send_email() -> None:
        raise smtplib.SMTPServerDisconnected("connection unexpectedly closed")

    middleware = AfterResponseMiddleware(adding(send_email), tracer_provider=tracer_provider)
    await get_and_drain(middleware, middleware)

    [span] = effect_spans(exporter)
    assert attrs(span)["after_response.task.outcome"] == "failed"
    assert attrs(span)["error.type"] == "smtplib.SMTPServerDisconnected"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "SMTPServerDisconnected"
    [event] = span.events
    assert event.name == "exception"
    event_attributes = dict(event.attributes or {})
    assert event_attributes["exception.type"] == "smtplib.SMTPServerDisconnected"
    assert event_attributes["exception.message"] == "connection unexpectedly closed"
    assert "in send_email" in str(event_attributes["exception.stacktrace"])


async def test_timed_out_task_span_has_outcome_timed_out_and_error_type_timeout(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    async def send_email() -> None:
        await anyio.sleep_forever()

    middleware = AfterResponseMiddleware(
        adding(send_email), tracer_provider=tracer_provider, task_timeout=0.05
    )
    await get_and_drain(middleware, middleware)

    [span] = effect_spans(exporter)
    assert attrs(span)["after_response.task.outcome"] == "timed_out"
    assert attrs(span)["error.type"] == "timeout"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "task timed out"
    assert span.events == ()  # a deadline is not an exception raised by the task


async def test_retries_leave_one_span_per_attempt_numbered_from_one(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    attempts = 0

    async def sync_crm() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError("crm unavailable")
        if attempts == 2:
            await anyio.sleep_forever()  # times out

    middleware = AfterResponseMiddleware(
        adding(sync_crm),
        tracer_provider=tracer_provider,
        task_timeout=0.05,
        retry=Retry(attempts=3, backoff=0, jitter=0),
    )
    app = AsgiInstrumentation(middleware, tracer_provider=tracer_provider)
    await get_and_drain(middleware, app)

    spans = sorted(effect_spans(exporter), key=lambda s: attrs(s)["after_response.task.attempt"])
    server = only(list(exporter.get_finished_spans()), SpanKind.SERVER)
    assert [attrs(s)["after_response.task.attempt"] for s in spans] == [1, 2, 3]
    assert [attrs(s)["after_response.task.outcome"] for s in spans] == [
        "retry",
        "retry",
        "succeeded",
    ]
    assert [attrs(s).get("error.type") for s in spans] == ["ConnectionError", "timeout", None]
    assert [s.status.status_code for s in spans] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert [len(s.events) for s in spans] == [1, 0, 0]
    assert {parent_id(s) for s in spans} == {ids(server)[1]}  # siblings, not nested


# -- tasks that never ran ------------------------------------------------------------------------


async def test_discarded_task_leaves_a_span_with_outcome_discarded(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    async def send_email() -> None:
        raise AssertionError("a 5xx request's tasks do not run")

    middleware = AfterResponseMiddleware(
        adding(send_email, status=503), tracer_provider=tracer_provider
    )
    app = AsgiInstrumentation(middleware, tracer_provider=tracer_provider)
    await get_and_drain(middleware, app)

    [span] = effect_spans(exporter)
    server = only(list(exporter.get_finished_spans()), SpanKind.SERVER)
    assert parent_id(span) == ids(server)[1]
    assert attrs(span)["after_response.task.outcome"] == "discarded"
    assert "error.type" not in attrs(span)  # by policy, not an error of the task
    assert "after_response.task.queue_duration" not in attrs(span)
    assert span.status.status_code is StatusCode.UNSET
    assert middleware.stats().discarded == 1


async def test_shed_task_leaves_an_error_span_with_outcome_shed(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    release = anyio.Event()

    async def blocker() -> None:
        await release.wait()

    async def send_email() -> None:
        pass

    middleware = AfterResponseMiddleware(
        adding(blocker, send_email),
        tracer_provider=tracer_provider,
        max_concurrency=1,
        max_pending=0,
        overflow_timeout=0.01,
    )
    app = AsgiInstrumentation(middleware, tracer_provider=tracer_provider)
    async with serve_uvicorn(app) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        release.set()
        assert await middleware.drain(timeout=10)

    by_name = {s.name: s for s in effect_spans(exporter)}
    shed = by_name[span_name(send_email)]
    server = only(list(exporter.get_finished_spans()), SpanKind.SERVER)
    assert parent_id(shed) == ids(server)[1]
    assert attrs(shed)["after_response.task.outcome"] == "shed"
    assert attrs(shed)["error.type"] == "shed"
    assert shed.status.status_code is StatusCode.ERROR
    assert attrs(by_name[span_name(blocker)])["after_response.task.outcome"] == "succeeded"
    assert middleware.stats().shed == 1


async def test_tasks_abandoned_at_shutdown_leave_error_spans_running_or_queued(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    started = anyio.Event()

    async def running() -> None:
        started.set()
        await anyio.sleep_forever()

    async def queued() -> None:
        raise AssertionError("never starts: the only slot is taken until shutdown")

    middleware = AfterResponseMiddleware(
        adding(running, queued),
        tracer_provider=tracer_provider,
        max_concurrency=1,
        shutdown_timeout=0.05,
        task_timeout=None,
    )
    app = AsgiInstrumentation(middleware, tracer_provider=tracer_provider)
    async with serve_uvicorn(app) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        await started.wait()
    # Leaving serve_uvicorn ran lifespan shutdown: the drain deadline passed, both abandoned.

    by_name = {s.name: s for s in effect_spans(exporter)}
    server_id = ids(only(list(exporter.get_finished_spans()), SpanKind.SERVER))[1]
    for task in (running, queued):
        span = by_name[span_name(task)]
        assert parent_id(span) == server_id
        assert attrs(span)["after_response.task.outcome"] == "abandoned"
        assert attrs(span)["error.type"] == "abandoned"
        assert span.status.status_code is StatusCode.ERROR
    # The one that ran has a queue duration; the one that never started has none.
    assert "after_response.task.queue_duration" in attrs(by_name[span_name(running)])
    assert "after_response.task.queue_duration" not in attrs(by_name[span_name(queued)])
    assert middleware.stats().abandoned == 2


async def test_task_abandoned_while_waiting_to_retry_leaves_a_span_for_its_next_attempt(
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    failed_once = anyio.Event()

    async def sync_crm() -> None:
        failed_once.set()
        raise ConnectionError("crm unavailable")

    middleware = AfterResponseMiddleware(
        adding(sync_crm),
        tracer_provider=tracer_provider,
        retry=Retry(attempts=2, backoff=60, jitter=0),
        shutdown_timeout=0.05,
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        await failed_once.wait()  # the task now sleeps in its backoff

    spans = sorted(effect_spans(exporter), key=lambda s: attrs(s)["after_response.task.attempt"])
    assert [
        (attrs(s)["after_response.task.attempt"], attrs(s)["after_response.task.outcome"])
        for s in spans
    ] == [(1, "retry"), (2, "abandoned")]
    abandoned = [r.getMessage() for r in caplog.records if " abandoned: " in r.getMessage()]
    assert len(abandoned) == 1
    message, task_id = abandoned[0].rstrip("]").split(" [task ")
    assert message.endswith(
        "sync_crm of GET / abandoned: shutdown_timeout elapsed while it waited to retry"
    )
    assert task_id == attrs(spans[0])["after_response.task.id"]


# -- arguments never reach a span ----------------------------------------------------------------


@dataclasses.dataclass
class User:
    email: str
    name: str


async def test_task_arguments_appear_in_no_span_metric_or_log_record(
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An email and a token, passed positionally, by keyword, in a partial and inside a
    dataclass, to tasks that succeed, fail (quoting the address, as smtplib does), time out,
    retry and get discarded: neither appears in any span, metric attribute or log record."""
    metric_reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[metric_reader])
    first_try = True

    def send_code(to: str, *, token: str) -> None:
        pass

    async def refused(to: str, *, token: str) -> None:
        raise smtplib.SMTPRecipientsRefused({to: (550, f"5.1.1 {to} ({token}): unknown".encode())})

    async def hangs(user: User, token: str) -> None:
        await anyio.sleep_forever()

    async def flaky(to: str, token: str) -> None:
        nonlocal first_try
        if first_try:
            first_try = False
            raise ValueError(f"rate limited for {to!r}, token={token}")

    def endpoint(request: Request) -> Response:
        collector = request.state.after_response
        collector.add(send_code, EMAIL, token=TOKEN)
        collector.add(functools.partial(send_code, EMAIL), token=TOKEN)
        collector.add(refused, EMAIL, token=TOKEN)
        collector.add(functools.partial(refused, EMAIL), token=TOKEN)
        collector.options(timeout=0.05).add(hangs, User(EMAIL, "Ada"), TOKEN)
        collector.options(retry=Retry(attempts=2, backoff=0, jitter=0)).add(flaky, EMAIL, TOKEN)
        status = 500 if request.url.path == "/fail" else 200
        return PlainTextResponse("ok", status_code=status)

    app = Starlette(routes=[Route(path, endpoint) for path in ("/", "/fail")])
    middleware = AfterResponseMiddleware(
        app, tracer_provider=tracer_provider, meter_provider=meter_provider
    )
    caplog.set_level("DEBUG", logger="after_response")
    outer = AsgiInstrumentation(middleware, tracer_provider=tracer_provider)
    await get_and_drain(middleware, outer, "/", "/fail")

    stats = middleware.stats()
    assert (stats.succeeded, stats.failed, stats.timed_out, stats.discarded) == (3, 2, 1, 6)
    secrets = (EMAIL, TOKEN)

    spans = effect_spans(exporter)
    assert {attrs(s)["after_response.task.outcome"] for s in spans} >= {
        "succeeded",
        "failed",
        "timed_out",
        "retry",
        "discarded",
    }
    seen_in_spans = [
        text
        for span in spans
        for text in (
            span.name,
            str(span.status.description),
            *map(str, attrs(span).values()),
            *(e.name for e in span.events),
            *(str(v) for e in span.events for v in (e.attributes or {}).values()),
        )
    ]
    exception_messages = [
        str((e.attributes or {}).get("exception.message")) for s in spans for e in s.events
    ]
    assert any("[redacted]" in message for message in exception_messages)
    assert not [text for text in seen_in_spans if any(secret in text for secret in secrets)]

    metrics_data = metric_reader.get_metrics_data()
    assert metrics_data is not None
    metric_attributes = [
        str(value)
        for resource in metrics_data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
        for value in (point.attributes or {}).values()
    ]
    assert metric_attributes
    assert not [text for text in metric_attributes if any(s in text for s in secrets)]

    records = [r for r in caplog.records if r.name == "after_response"]
    assert records
    for record in records:
        # The message, its arguments, every extra field and the traceback, as formatted.
        assert record.exc_info is None
        texts = [logging.Formatter().format(record), *map(str, vars(record).values())]
        assert not [t for t in texts if any(secret in t for secret in secrets)], record
    meter_provider.shutdown()


async def test_exception_events_redact_arguments_inside_containers_and_dataclasses(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    phone = "+44 20 7946 0958"

    async def notify(user: User, headers: dict[str, str], lines: list[bytes], *, to: str) -> None:
        raise ValueError(f"cannot notify {user!r} with {headers} about {lines} at {to}")

    def endpoint(request: Request) -> None:
        request.state.after_response.add(
            functools.partial(notify, User(EMAIL, "Ada"), {"Authorization": TOKEN}),
            [phone.encode()],
            to=f"sms:{phone}",
        )

    middleware = AfterResponseMiddleware(app_with(endpoint), tracer_provider=tracer_provider)
    await get_and_drain(middleware, middleware)

    [span] = effect_spans(exporter)
    [event] = span.events
    message = str((event.attributes or {})["exception.message"])
    stacktrace = str((event.attributes or {})["exception.stacktrace"])
    for secret in (EMAIL, TOKEN, phone):
        assert secret not in message
        assert secret not in stacktrace
    assert "cannot notify User(email='[redacted]', name='Ada')" in message  # short: kept
    assert "ValueError: cannot notify" in stacktrace


async def test_a_task_group_failure_shows_each_error_redacted_in_its_log_line_and_span(
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A side effect that fans out: its task group raises an ExceptionGroup, whose own message
    says only how many errors it holds."""

    async def sync_everything(token: str) -> None:
        async def call_crm() -> None:
            raise ConnectionError(f"crm refused {token}")

        async def call_billing() -> None:
            raise KeyError(f"no plan for {token}")

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(call_crm)
            task_group.start_soon(call_billing)

    def endpoint(request: Request) -> None:
        request.state.after_response.add(sync_everything, TOKEN)

    middleware = AfterResponseMiddleware(app_with(endpoint), tracer_provider=tracer_provider)
    caplog.set_level(logging.ERROR, logger="after_response")
    await get_and_drain(middleware, middleware)

    [record] = [r for r in caplog.records if "failed after" in r.getMessage()]
    [span] = effect_spans(exporter)
    [event] = span.events
    for text in (
        logging.Formatter().format(record),
        str((event.attributes or {})["exception.stacktrace"]),
    ):
        assert TOKEN not in text
        assert "ExceptionGroup: unhandled errors in a TaskGroup (2 sub-exceptions)\n" in text
        assert re.search(
            r"\| +File .*, in call_crm\n(.*\n)*? +\| ConnectionError: crm refused \[redacted\]\n",
            text,
        )
        assert re.search(
            r"\| +File .*, in call_billing\n(.*\n)*? +\| KeyError: 'no plan for \[redacted\]'\n",
            text,
        )


# -- tracing off ---------------------------------------------------------------------------------


async def test_without_providers_no_spans_are_made_and_tasks_still_run(
    monkeypatch: pytest.MonkeyPatch, exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    """The global provider is the API's proxy (no SDK configured): the middleware makes no
    spans, while the server span of an instrumentation given its own provider is untouched."""
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)  # undo any other test's global SDK
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    ran: list[str] = []

    async def send_email() -> None:
        ran.append("send_email")

    middleware = AfterResponseMiddleware(adding(send_email))
    app = AsgiInstrumentation(middleware, tracer_provider=tracer_provider)
    await get_and_drain(middleware, app, "/", "/")

    assert ran == ["send_email", "send_email"]
    assert effect_spans(exporter) == []
    assert len([s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]) == 2
    assert middleware.stats().succeeded == 2


async def test_a_no_op_tracer_provider_turns_tracing_off(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    async def send_email() -> None:
        pass

    middleware = AfterResponseMiddleware(adding(send_email), tracer_provider=NoOpTracerProvider())
    app = AsgiInstrumentation(middleware, tracer_provider=tracer_provider)
    await get_and_drain(middleware, app)

    assert effect_spans(exporter) == []
    assert middleware.stats().succeeded == 1


async def test_concurrent_tasks_each_get_their_own_span_and_outcome(
    exporter: InMemorySpanExporter, tracer_provider: TracerProvider
) -> None:
    """Many concurrent tasks, one span each, each with its own name and outcome."""
    released = anyio.Event()

    async def waits() -> None:
        await released.wait()

    async def fails() -> None:
        await released.wait()
        raise RuntimeError("boom")

    def endpoint(request: Request) -> None:
        for _ in range(10):
            request.state.after_response.add(waits)
            request.state.after_response.add(fails)

    middleware = AfterResponseMiddleware(app_with(endpoint), tracer_provider=tracer_provider)
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        released.set()
        assert await middleware.drain(timeout=10)

    outcomes = sorted(
        (s.name, attrs(s)["after_response.task.outcome"], attrs(s).get("error.type"))
        for s in effect_spans(exporter)
    )
    assert (
        outcomes
        == [(span_name(fails), "failed", "RuntimeError")] * 10
        + [(span_name(waits), "succeeded", None)] * 10
    )
