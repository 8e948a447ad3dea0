"""Tracing: every side effect is a span in the trace of the request that added it.

Run it (from the repository root)::

    python examples/tracing_app.py               # serves http://127.0.0.1:8000
    python examples/tracing_app.py --self-test   # sends two requests, prints their traces, exits

then, in another terminal::

    curl -s localhost:8000/login --json '{"email": "ada@example.com"}'
    curl -s localhost:8000/signup --json '{"email": "grace@example.com", "name": "Grace"}'

``POST /login`` answers at once and sends a verification email after the response (the SMTP
conversation is simulated by a short delay). ``POST /signup`` fans out to three side effects:
a welcome email; an analytics beacon that fails (the analytics service is "down"); and a CRM
sync, a plain function run in a worker thread, whose first attempt fails and whose retry
succeeds. The OpenTelemetry ASGI instrumentation, outermost, opens each request's server span;
``AfterResponseMiddleware`` opens one span per attempt of each side effect under it, and the
spans a side effect opens itself (``smtp send``) nest under that.

Where the telemetry goes:

- ``OTEL_EXPORTER_OTLP_ENDPOINT`` set (``http://localhost:4318`` for Jaeger,
  ``http://localhost:6006`` for Phoenix): spans and metrics are exported over OTLP/HTTP (needs
  ``pip install opentelemetry-exporter-otlp-proto-http``). ``OTEL_METRICS_EXPORTER=none``
  exports spans only (Jaeger and Phoenix take no metrics); ``OTEL_SERVICE_NAME`` names the
  service (default ``after-response-example``).
- otherwise each request's trace is printed as an indented tree once its side effects are done.

``PORT`` sets the port (8000).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
from opentelemetry import context, trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.metrics import MeterProvider, NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SDKSpan
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

if not __package__:  # run as `python examples/tracing_app.py`: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from after_response import AfterResponseMiddleware, Retry, side_effect
from examples.local_servers import serve, wait_for_interrupt

#: Seconds the simulated SMTP server takes to accept a message.
SMTP_DELAY = 0.05


class Services:
    """The app's clients of the outside world, simulated: each opens the client span a real
    client would. Never with an address, code or name in it: a span says what was done."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer("examples.tracing_app", tracer_provider=tracer_provider)
        self._crm_calls: collections.Counter[str] = collections.Counter()

    async def smtp_send(self, to: str, subject: str) -> None:
        with self.tracer.start_as_current_span(
            "smtp send",
            kind=SpanKind.CLIENT,
            attributes={"server.address": "smtp.example.com", "server.port": 587},
        ):
            await anyio.sleep(SMTP_DELAY)

    async def post_event(self, name: str, user_id: str) -> None:
        """The analytics service is down: this always fails."""
        with self.tracer.start_as_current_span("POST /events", kind=SpanKind.CLIENT):
            raise ConnectionError("analytics.example.com refused the connection")

    def upsert_contact(self, user_id: str, email: str) -> None:
        """A blocking CRM client: its first call for each user gets a 503."""
        self._crm_calls[user_id] += 1
        with self.tracer.start_as_current_span("PUT /contacts", kind=SpanKind.CLIENT):
            time.sleep(0.01)
            if self._crm_calls[user_id] == 1:
                raise ConnectionError("crm.example.com answered 503")


# -- side effects --------------------------------------------------------------------------------


@side_effect(timeout=30)
async def send_verification_email(services: Services, to: str, code: str) -> None:
    await services.smtp_send(to, f"Your code is {code}")


@side_effect(timeout=30)
async def send_welcome_email(services: Services, to: str, name: str) -> None:
    await services.smtp_send(to, f"Welcome, {name}")


@side_effect(timeout=5)
async def track_signup(services: Services, user_id: str) -> None:
    await services.post_event("signup", user_id)


@side_effect(timeout=5, retry=Retry(attempts=3, backoff=0.05, jitter=0))
def sync_crm(services: Services, user_id: str, email: str) -> None:
    """Plain (blocking) function: the middleware runs it in a worker thread."""
    services.upsert_contact(user_id, email)


# -- the app -------------------------------------------------------------------------------------


async def login(request: Request) -> JSONResponse:
    email = (await request.json()).get("email", "")
    code = f"{secrets.randbelow(10**6):06d}"
    request.state.after_response.add(
        send_verification_email, request.app.state.services, email, code
    )
    return JSONResponse({"message": "We sent you a code."})


async def signup(request: Request) -> JSONResponse:
    payload = await request.json()
    email, name = payload.get("email", ""), payload.get("name", "")
    user_id = secrets.token_hex(4)
    services = request.app.state.services
    collector = request.state.after_response
    collector.add(send_welcome_email, services, email, name)
    collector.add(track_signup, services, user_id)
    collector.add(sync_crm, services, user_id, email)
    return JSONResponse({"id": user_id}, status_code=201)


def create_app(
    tracer_provider: trace.TracerProvider, meter_provider: MeterProvider | None = None
) -> tuple[ASGIApp, AfterResponseMiddleware]:
    """The app to serve (instrumentation outermost) and the middleware (for ``drain()``)."""
    app = Starlette(
        routes=[
            Route("/login", login, methods=["POST"]),
            Route("/signup", signup, methods=["POST"]),
        ]
    )
    app.state.services = Services(tracer_provider)
    middleware = AfterResponseMiddleware(
        app, tracer_provider=tracer_provider, meter_provider=meter_provider
    )
    server = OpenTelemetryMiddleware(
        middleware,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider or NoOpMeterProvider(),
        exclude_spans=["receive", "send"],  # one span per request, not per ASGI message
    )
    return server, middleware


# -- where the telemetry goes --------------------------------------------------------------------


class TraceTreePrinter(SpanProcessor):
    """Prints each trace as an indented tree once none of its spans is open.

    A request's server span ends with its response, before its side effects start; with
    ``quiet_period`` set, a trace is printed only after that long with no span open, which
    lets them start (and retry) first; spans that start later still (a retry after a longer
    backoff) print as a tree of their own. Without it, traces print on :meth:`flush`.
    """

    def __init__(
        self, write: Callable[[str], object] = print, *, quiet_period: float | None = 0.5
    ) -> None:
        self._write = write
        self._quiet_period = quiet_period
        self._lock = threading.Lock()
        self._open: collections.Counter[int] = collections.Counter()
        self._ended: dict[int, list[ReadableSpan]] = {}
        self._timers: dict[int, threading.Timer] = {}

    def on_start(self, span: SDKSpan, parent_context: context.Context | None = None) -> None:
        trace_id = span.get_span_context().trace_id
        with self._lock:
            self._open[trace_id] += 1
            timer = self._timers.pop(trace_id, None)
        if timer is not None:
            timer.cancel()

    def on_end(self, span: ReadableSpan) -> None:
        assert span.context is not None
        trace_id = span.context.trace_id
        with self._lock:
            self._ended.setdefault(trace_id, []).append(span)
            self._open[trace_id] -= 1
            if self._open[trace_id] or self._quiet_period is None:
                return
            timer = threading.Timer(self._quiet_period, self._print, (trace_id,))
            timer.daemon = True
            self._timers[trace_id] = timer
        timer.start()

    def flush(self) -> None:
        """Print every trace whose spans have all ended."""
        with self._lock:
            done = [trace_id for trace_id in self._ended if not self._open[trace_id]]
        for trace_id in done:
            self._print(trace_id)

    def shutdown(self) -> None:
        self.flush()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self.flush()
        return True

    def _print(self, trace_id: int) -> None:
        with self._lock:
            if self._open[trace_id]:
                return
            spans = self._ended.pop(trace_id, [])
            del self._open[trace_id]
            self._timers.pop(trace_id, None)
        for line in ["", *format_tree(spans)]:
            self._write(line)


def format_tree(spans: Sequence[ReadableSpan]) -> list[str]:
    """One trace as lines: each span under its parent, in start order, times from the start."""
    if not spans:
        return []
    ids = {s.context.span_id for s in spans if s.context is not None}
    children: dict[int | None, list[ReadableSpan]] = collections.defaultdict(list)
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        parent = span.parent.span_id if span.parent and span.parent.span_id in ids else None
        children[parent].append(span)
    origin = min(s.start_time or 0 for s in spans)
    first = spans[0].context
    lines = [f"trace {first.trace_id:032x}" if first is not None else "trace"]

    def walk(parent: int | None, prefix: str) -> None:
        siblings = children.get(parent, [])
        for index, span in enumerate(siblings):
            last = index == len(siblings) - 1
            if parent is None:  # a root: no branch
                branch, extend = "", ""
            else:
                branch, extend = ("└─ ", "   ") if last else ("├─ ", "│  ")
            lines.append(f"{prefix}{branch}{_describe(span, origin)}")
            if span.context is not None:
                walk(span.context.span_id, prefix + extend)

    walk(None, "")
    return lines


def _describe(span: ReadableSpan, origin: int) -> str:
    start = ((span.start_time or origin) - origin) / 1e6
    duration = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
    attributes = dict(span.attributes or {})
    details = [span.kind.name.lower(), f"at +{start:.1f} ms", f"took {duration:.1f} ms"]
    status = attributes.get("http.status_code", attributes.get("http.response.status_code"))
    if status is not None:
        details.append(f"status {status}")
    if "after_response.task.outcome" in attributes:
        details.append(f"attempt {attributes['after_response.task.attempt']}")
        details.append(str(attributes["after_response.task.outcome"]))
    if "error.type" in attributes:
        details.append(f"error.type={attributes['error.type']}")
    if span.status.status_code is StatusCode.ERROR:
        details.append("ERROR")
    return f"{span.name}  ({', '.join(details)})"


@dataclass
class Telemetry:
    """The providers to pass to the middlewares, and how to flush and stop them."""

    tracer_provider: TracerProvider
    meter_provider: SDKMeterProvider | None = None
    printer: TraceTreePrinter | None = None
    #: Where spans go, for the start-up message.
    destination: str = "the console"

    def flush(self) -> None:
        self.tracer_provider.force_flush()
        if self.meter_provider is not None:
            self.meter_provider.force_flush()

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def configure_telemetry(
    write: Callable[[str], object] = print, *, quiet_period: float | None = 0.5
) -> Telemetry:
    """OTLP/HTTP export if ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, else trees on the console.

    The providers are returned, not set globally: they are passed to both middlewares. (An
    app may also call ``trace.set_tracer_provider``; the middleware picks the global one up.)
    """
    resource = Resource.create(
        {SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", "after-response-example")}
    )
    tracer_provider = TracerProvider(resource=resource)
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        printer = TraceTreePrinter(write, quiet_period=quiet_period)
        tracer_provider.add_span_processor(printer)
        return Telemetry(tracer_provider, printer=printer)

    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Both exporters read OTEL_EXPORTER_OTLP_ENDPOINT and append /v1/traces, /v1/metrics.
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    destination = f"OTLP/HTTP {endpoint}"
    if os.environ.get("OTEL_METRICS_EXPORTER", "otlp") == "none":  # Jaeger, Phoenix: traces only
        return Telemetry(tracer_provider, destination=destination)
    meter_provider = SDKMeterProvider(
        resource=resource,
        metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())],
    )
    return Telemetry(tracer_provider, meter_provider, destination=destination)


# -- running it ----------------------------------------------------------------------------------


async def self_test(telemetry: Telemetry, write: Callable[[str], object] = print) -> list[int]:
    """Serve the app on a free port, send a login and a signup, wait for their side effects,
    print (or export) their traces; returns the response statuses."""
    app, middleware = create_app(telemetry.tracer_provider, telemetry.meter_provider)
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        responses = [
            await client.post("/login", json={"email": "ada@example.com"}),
            await client.post("/signup", json={"email": "grace@example.com", "name": "Grace"}),
        ]
        await middleware.drain(timeout=30)
    telemetry.flush()
    stats = middleware.stats()
    write(
        f"{len(responses)} requests, {stats.added} side effects: {stats.succeeded} succeeded, "
        f"{stats.failed} failed, {stats.retried} retried; spans went to {telemetry.destination}"
    )
    return [response.status_code for response in responses]


async def serve_until_interrupted(telemetry: Telemetry, port: int) -> None:
    app, _ = create_app(telemetry.tracer_provider, telemetry.meter_provider)
    async with serve(app, port=port) as url:
        print(f"tracing example on {url}; spans go to {telemetry.destination}")
        print(f'  curl -s {url}/login --json \'{{"email": "ada@example.com"}}\'')
        print(
            f'  curl -s {url}/signup --json \'{{"email": "grace@example.com", "name": "Grace"}}\''
        )
        print("Ctrl-C to stop (pending side effects run first).")
        await wait_for_interrupt()


class CorrelatedFormatter(logging.Formatter):
    """Appends the fields the middleware puts on its log lines (task, request, trace)."""

    FIELDS = ("task_name", "request_method", "request_path", "trace_id", "span_id", "error_type")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [
            f"{name}={record.__dict__[name]}" for name in self.FIELDS if name in record.__dict__
        ]
        if not fields:
            return text
        first, newline, rest = text.partition("\n")
        return f"{first}  [{' '.join(fields)}]{newline}{rest}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--self-test",
        action="store_true",
        help="send a login and a signup to the app, print their traces, and exit",
    )
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(CorrelatedFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("after_response").addHandler(handler)
    logging.getLogger("after_response").propagate = False
    telemetry = configure_telemetry(quiet_period=None if args.self_test else 0.5)
    try:
        if args.self_test:
            statuses = anyio.run(self_test, telemetry)
            return 0 if statuses == [200, 201] else 1
        anyio.run(serve_until_interrupted, telemetry, int(os.environ.get("PORT", "8000")))
        return 0
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    sys.exit(main())
