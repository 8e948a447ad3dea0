"""The demo behind ``./demo.sh``: after-response against awaiting the email, measured.

Run it (from the repository root; ``./demo.sh`` sets up a virtualenv first)::

    python -m examples.demo [--logins 120] [--rate 40] [--quick]

It serves the login example (``examples/login.py``) with uvicorn on 127.0.0.1, with a local SMTP
server that takes 100-200 ms to accept each message, as a real provider does. It sends the same
logins, arriving at a steady rate, to ``POST /login-blocking``, which awaits the email, then to
``POST /login``, which leaves it to after-response; then it prints, as measured in this run: both
latencies side by side, the emails the SMTP server received against those the app accepted to
send, and the OpenTelemetry trace of one login (``opentelemetry-instrumentation-asgi``'s server
span outside the middleware, the side effect's span under it).

Arrivals are paced (an open loop) rather than fired by a fixed number of clients that wait for
their answers: everything here (client, server, side effects, SMTP server) shares one Python
process, and a closed loop would measure how fast that process saturates, not what a user waits.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

if not __package__:  # run as `python examples/demo.py`: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples import login
from examples.local_servers import SMTPSink, serve
from examples.mail import SMTPSettings

SMTP_DELAY = (0.1, 0.2)  # seconds the local SMTP server takes per message


@dataclass
class DemoResult:
    """What one run measured (latencies in seconds)."""

    blocking: list[float]
    after_response: list[float]
    #: Logins the app answered 200 to, each of which owes one email.
    emails_sent: int
    #: Messages the SMTP server accepted, counted after the server's graceful shutdown.
    emails_received: int
    #: The spans of one traced login, its server span first.
    trace: list[ReadableSpan]


async def run_demo(
    *,
    logins: int = 120,
    rate: float = 40.0,
    smtp_delay: tuple[float, float] = SMTP_DELAY,
    write: Callable[[str], object] = print,
) -> DemoResult:
    """Run the demo, writing its report line by line with ``write``."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    with SMTPSink(delay=smtp_delay) as sink:
        middleware = login.create_app(
            SMTPSettings(host=sink.host, port=sink.port), tracer_provider=tracer_provider
        )
        # The usual OpenTelemetry ASGI instrumentation, outside the middleware: it opens the
        # request's server span; the middleware parents each side effect's span to it.
        app = OpenTelemetryMiddleware(
            middleware, tracer_provider=tracer_provider, exclude_spans=["receive"]
        )
        async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            await _warm_up(client)
            blocking = await _batch(client, "/login-blocking", logins, rate)
            after_response = await _batch(client, "/login", logins, rate)
            # One more login, alone, to show its trace.
            await middleware.drain()
            exporter.clear()
            traced = await client.post("/login", json={"email": "traced@example.com"})
            traced.raise_for_status()
        # Leaving serve() shut the server down gracefully: the middleware drained every
        # email at lifespan shutdown, and every request's span has ended.
        emails_received = len(sink.messages)
    stats = middleware.stats()
    result = DemoResult(
        blocking=blocking,
        after_response=after_response,
        emails_sent=len(blocking) + len(after_response) + 1,
        emails_received=emails_received,
        trace=_one_trace(exporter.get_finished_spans()),
    )
    low, high = smtp_delay
    write(
        f"after-response demo: {logins} logins per endpoint, {rate:g} a second, served by uvicorn "
        "on 127.0.0.1;"
    )
    write(
        f"a local SMTP server takes {low * 1000:.0f}-{high * 1000:.0f} ms to accept each email, "
        "as a real provider does."
    )
    write("")
    write("Login latency seen by the client, measured in this run:")
    for line in _latency_table(result):
        write(line)
    write("")
    lost = result.emails_sent - result.emails_received
    write(
        f"Emails: {result.emails_sent} sent, {result.emails_received} received by the SMTP "
        f"server: {'none lost' if lost == 0 else f'{lost} LOST'}."
    )
    write(
        f"Side effects: {stats.succeeded} succeeded, {stats.failed} failed, "
        f"{stats.timed_out} timed out, {stats.abandoned} abandoned."
    )
    write("")
    for line in format_trace(result.trace):
        write(line)
    return result


async def _warm_up(client: httpx.AsyncClient) -> None:
    """Open connections and warm the code paths (a wrong code sends no email)."""
    async with anyio.create_task_group() as task_group:
        for _ in range(10):
            task_group.start_soon(
                functools.partial(client.post, "/verify", json={"email": "x@example.com"})
            )


async def _batch(client: httpx.AsyncClient, path: str, count: int, rate: float) -> list[float]:
    """POST ``count`` logins to ``path``, one every ``1 / rate`` seconds whether or not the
    earlier ones were answered; returns each one's latency."""
    latencies: list[float] = []

    async def one(number: int) -> None:
        started = time.perf_counter()
        response = await client.post(path, json={"email": f"user{number}@example.com"})
        latencies.append(time.perf_counter() - started)
        response.raise_for_status()

    start = anyio.current_time()
    async with anyio.create_task_group() as task_group:
        for number in range(count):
            await anyio.sleep_until(start + number / rate)  # pacing the arrivals
            task_group.start_soon(one, number)
    return latencies


def _latency_table(result: DemoResult) -> list[str]:
    blocking, after = _summary(result.blocking), _summary(result.after_response)
    rows = [
        ("awaiting the email", "POST /login-blocking", *(f"{s * 1000:.1f} ms" for s in blocking)),
        ("after-response", "POST /login", *(f"{s * 1000:.1f} ms" for s in after)),
        ("speed-up", "", *(f"{b / a:.0f}x" for b, a in zip(blocking, after, strict=True))),
    ]
    lines = [f"  {'':<20}{'':<22}{'median':>10}{'p99':>11}"]
    lines += [f"  {what:<20}{path:<22}{median:>10}{p99:>11}" for what, path, median, p99 in rows]
    return lines


def _summary(latencies: Sequence[float]) -> tuple[float, float]:
    """Median and 99th percentile."""
    p99 = statistics.quantiles(latencies, n=100, method="inclusive")[98]
    return statistics.median(latencies), p99


def _one_trace(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    """The spans of the trace whose root is the (only) server span, root first."""
    [root] = [span for span in spans if span.kind is SpanKind.SERVER]
    assert root.context is not None
    trace_id = root.context.trace_id
    rest = [s for s in spans if s is not root and s.context and s.context.trace_id == trace_id]
    return [root, *sorted(rest, key=lambda span: span.start_time or 0)]


def format_trace(spans: Sequence[ReadableSpan]) -> list[str]:
    """One trace as an indented tree: offset from the root's start, duration, name, notes."""
    root = spans[0]
    assert root.start_time is not None
    children: dict[int, list[ReadableSpan]] = {}
    for span in spans[1:]:
        if span.parent is not None:
            children.setdefault(span.parent.span_id, []).append(span)

    rows: list[tuple[int, ReadableSpan]] = []

    def walk(span: ReadableSpan, depth: int) -> None:
        rows.append((depth, span))
        assert span.context is not None
        for child in children.get(span.context.span_id, []):
            walk(child, depth + 1)

    walk(root, 0)
    width = max(2 * depth + len(span.name) for depth, span in rows) + 2
    lines = [
        "One more login, traced with OpenTelemetry (offsets from the start of its request):",
        f"  {'start':>9} {'duration':>10}  span",
    ]
    response_done = 0.0
    for depth, span in rows:
        start = ((span.start_time or 0) - root.start_time) / 1e6
        duration = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        name = f"{'  ' * depth}{span.name}"
        lines.append(f"  {start:>+7.1f} ms {duration:>7.1f} ms  {name:<{width}}{_note(span)}")
        if (span.attributes or {}).get("asgi.event.type") == "http.response.body":
            response_done = start + duration
    effects = [span for _, span in rows if span.name.startswith("after_response ")]
    if effects:
        first = min((span.start_time or 0) - root.start_time for span in effects) / 1e6
        last = max((span.end_time or 0) - root.start_time for span in effects) / 1e6
        lines.append(
            f"The client had the whole response at +{response_done:.1f} ms; the email ran from "
            f"+{first:.1f} to +{last:.1f} ms,"
        )
        lines.append("after the response, in a span of its own under the request's server span.")
    return lines


def _note(span: ReadableSpan) -> str:
    attributes = span.attributes or {}
    if span.kind is SpanKind.SERVER:
        status = attributes.get("http.response.status_code", attributes.get("http.status_code"))
        return f"server span, status {status}"
    if "asgi.event.type" in attributes:
        return str(attributes["asgi.event.type"])
    outcome = attributes.get("after_response.task.outcome")
    if outcome is not None:
        queued = attributes.get("after_response.task.queue_duration", 0.0)
        assert isinstance(queued, float)
        return f"side effect: {outcome!s}, queued {queued * 1000:.1f} ms"
    return f"{span.kind.name.lower()} span"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--logins", type=int, default=120, help="logins per endpoint (120)")
    parser.add_argument("--rate", type=float, default=40.0, help="logins a second (40)")
    parser.add_argument("--quick", action="store_true", help="20 logins per endpoint")
    args = parser.parse_args(argv)
    logins = 20 if args.quick else args.logins
    result = anyio.run(functools.partial(run_demo, logins=logins, rate=args.rate))
    return 0 if result.emails_received == result.emails_sent else 1


if __name__ == "__main__":
    sys.exit(main())
