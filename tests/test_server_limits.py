"""Per side-effect limits, the loop watchdog and log aggregation, on a real server."""

from __future__ import annotations

import logging
import time

import anyio
import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from after_response import AfterResponseMiddleware, side_effect

from .servers import serve_uvicorn

pytestmark = [pytest.mark.anyio, pytest.mark.server]


class Downstream:
    """A third party that counts concurrent calls and the time of every call."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.calls: list[float] = []

    async def call(self, seconds: float) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        self.calls.append(time.monotonic())
        try:
            await anyio.sleep(seconds)
        finally:
            self.now -= 1


CRM = Downstream()


@side_effect(max_concurrency=2)
async def sync_crm(seconds: float) -> None:
    await CRM.call(seconds)


async def test_own_concurrency_limit_holds_across_requests_without_blocking_others() -> None:
    other_ran: list[float] = []

    async def other() -> None:
        other_ran.append(time.monotonic())

    async def endpoint(request: Request) -> PlainTextResponse:
        for _ in range(5):
            request.state.after_response.add(sync_crm, 0.05)
        request.state.after_response.add(other)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]), max_concurrency=10
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        started = time.monotonic()
        for _ in range(4):
            await client.get("/")
        with anyio.fail_after(10):
            while len(other_ran) < 4:  # noqa: ASYNC110 - a bounded poll on a side effect's list
                await anyio.sleep(0.005)
        others_done = max(other_ran)
        assert await middleware.drain(timeout=10)
    assert CRM.peak == 2  # never more than its own limit, across the four requests
    assert len(CRM.calls) == 20
    # The limited ones waited without holding global slots: the others ran at once.
    assert others_done - started < max(CRM.calls) - started
    stats = middleware.stats()
    assert (stats.succeeded, stats.pending, stats.running) == (24, 0, 0)


async def test_a_rate_limit_is_never_exceeded_in_any_window() -> None:
    beacon = Downstream()

    async def send_beacon() -> None:
        await beacon.call(0)

    async def endpoint(request: Request) -> PlainTextResponse:
        for _ in range(12):
            request.state.after_response.options(rate_limit="5/200ms").add(send_beacon)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(Starlette(routes=[Route("/", endpoint)]))
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=10)
    calls = sorted(beacon.calls)
    assert len(calls) == 12
    for i in range(len(calls) - 5):
        assert calls[i + 5] - calls[i] >= 0.2 - 0.005  # any 6 starts span a whole window


async def test_an_async_side_effect_that_blocks_the_loop_is_named_in_a_warning_span_and_metric(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    async def blocking_report() -> None:
        time.sleep(0.3)  # noqa: ASYNC251 - the mistake under test: blocking the loop

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", lambda r: _adding(r, blocking_report))]),
        loop_block_threshold=0.1,
        tracer_provider=tracer_provider,
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    caplog.set_level(logging.WARNING, logger="after_response")
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
        with anyio.fail_after(5):  # the report comes from the next heartbeat on the loop
            while not any("held the event loop" in r.getMessage() for r in caplog.records):  # noqa: ASYNC110
                await anyio.sleep(0.01)
    [line] = [r for r in caplog.records if "held the event loop" in r.getMessage()]
    assert line.task_name.endswith("blocking_report")  # type: ignore[attr-defined]
    [span] = [s for s in exporter.get_finished_spans() if "blocking_report" in s.name]
    assert [e.name for e in span.events] == ["after_response.loop_blocked"]
    metrics = reader.get_metrics_data()
    assert metrics is not None
    points = [
        point
        for resource in metrics.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "after_response.task.loop_blocked"
        for point in metric.data.data_points  # type: ignore[union-attr]
    ]
    assert [point.value for point in points] == [1]


def _adding(request: Request, fn: object) -> PlainTextResponse:
    request.state.after_response.add(fn)
    return PlainTextResponse("ok")


async def test_a_flood_of_100_000_shed_tasks_writes_a_bounded_number_of_lines_and_counts_all(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = anyio.Event()

    async def blocked() -> None:
        await release.wait()

    async def noop() -> None:
        pass

    async def endpoint(request: Request) -> PlainTextResponse:
        collector = request.state.after_response
        collector.add(blocked)
        for _ in range(25_000):
            collector.options(name="analytics_beacon").add(noop)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]),
        max_concurrency=1,
        max_pending=0,
        overflow_timeout=0.01,
    )
    caplog.set_level(logging.ERROR, logger="after_response")
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        for _ in range(4):
            await client.get("/")
        release.set()
        assert await middleware.drain(timeout=30)
    stats = middleware.stats()
    assert stats.shed == 100_000 + 3  # the beacons, and three of the four blocked tasks
    lines = [r for r in caplog.records if r.name == "after_response"]
    assert len(lines) <= 10
    summarised = sum(getattr(r, "aggregated_count", 0) for r in lines)
    written = sum(1 for r in lines if " shed: " in r.getMessage())
    assert written + summarised == stats.shed  # every shed task is in a line or a count
