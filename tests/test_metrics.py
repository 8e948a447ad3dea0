"""Metrics count what happened to each task, exactly, and the gauges return to zero.

An explicit SDK ``MeterProvider`` with an ``InMemoryMetricReader`` (cumulative), never the
global one; the app under uvicorn on 127.0.0.1; the reader is read after ``drain()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
    Sum,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from after_response import AfterResponseMiddleware, Retry, SQLiteStore
from after_response._store import StoredTask

from . import durable_tasks
from .durable_process import until
from .servers import serve_uvicorn

pytestmark = pytest.mark.anyio

SECONDS_BUCKETS = (
    *(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def meter_provider(reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[reader])
    yield provider
    provider.shutdown()


def metrics_by_name(reader: InMemoryMetricReader) -> dict[str, Metric]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        if scope.scope.name == "after_response"
        for metric in scope.metrics
    }


def key(point: NumberDataPoint | HistogramDataPoint) -> tuple[Any, ...]:
    attributes = dict(point.attributes or {})
    name = attributes.pop("after_response.task.name")
    outcome = attributes.pop("after_response.task.outcome", None)
    assert attributes == {}, "no attribute other than the task name and outcome"
    return (name, outcome) if outcome is not None else (name,)


def sums(metric: Metric) -> dict[tuple[Any, ...], int]:
    assert isinstance(metric.data, Sum)
    return {key(p): int(p.value) for p in metric.data.data_points if p.value}


def gauges(metric: Metric) -> dict[tuple[Any, ...], int]:
    """Every data point, 0 included."""
    assert isinstance(metric.data, Sum)
    return {key(p): int(p.value) for p in metric.data.data_points}


def gauge_values(metric: Metric) -> list[int]:
    assert isinstance(metric.data, Sum)
    return [int(p.value) for p in metric.data.data_points]


def histogram_counts(metric: Metric) -> dict[tuple[Any, ...], int]:
    assert isinstance(metric.data, Histogram)
    return {key(p): p.count for p in metric.data.data_points}


async def test_counters_and_histograms_match_a_known_workload_exactly(
    reader: InMemoryMetricReader, meter_provider: MeterProvider
) -> None:
    flaky_calls = 0

    async def ok() -> None:
        pass

    async def fail() -> None:
        raise ConnectionError("down")

    async def slow() -> None:
        await anyio.sleep_forever()

    async def flaky() -> None:
        nonlocal flaky_calls
        flaky_calls += 1
        if flaky_calls == 1:
            raise ConnectionError("once")

    async def endpoint(request: Request) -> PlainTextResponse:
        collector = request.state.after_response
        collector.options(name="ok").add(ok)
        if request.url.path == "/boom":
            return PlainTextResponse("failed", status_code=500)
        collector.options(name="ok").add(ok)
        collector.options(name="fail").add(fail)
        collector.options(name="slow", timeout=0.05).add(slow)
        collector.options(name="flaky", retry=Retry(attempts=2, backoff=0, jitter=0)).add(flaky)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint), Route("/boom", endpoint)])
    middleware = AfterResponseMiddleware(app, meter_provider=meter_provider)
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        await client.get("/boom")
        assert await middleware.drain(timeout=10)

        metrics = metrics_by_name(reader)
        assert sums(metrics["after_response.task.added"]) == {
            ("ok",): 3,
            ("fail",): 1,
            ("slow",): 1,
            ("flaky",): 1,
        }
        assert sums(metrics["after_response.task.finished"]) == {
            ("ok", "succeeded"): 2,
            ("ok", "discarded"): 1,
            ("fail", "failed"): 1,
            ("slow", "timed_out"): 1,
            ("flaky", "succeeded"): 1,
        }
        assert sums(metrics["after_response.task.retries"]) == {("flaky",): 1}
        # One duration per attempt that ran to an outcome; one queue wait per attempt started.
        assert histogram_counts(metrics["after_response.task.duration"]) == {
            ("ok", "succeeded"): 2,
            ("fail", "failed"): 1,
            ("slow", "timed_out"): 1,
            ("flaky", "retry"): 1,
            ("flaky", "succeeded"): 1,
        }
        assert histogram_counts(metrics["after_response.task.queue.duration"]) == {
            ("ok",): 2,
            ("fail",): 1,
            ("slow",): 1,
            ("flaky",): 2,
        }
        assert set(gauge_values(metrics["after_response.task.pending"])) <= {0}
        assert set(gauge_values(metrics["after_response.task.running"])) == {0}

    stats = middleware.stats()  # the same story as the metrics
    assert (stats.added, stats.succeeded, stats.failed, stats.timed_out) == (6, 3, 1, 1)
    assert (stats.discarded, stats.retried) == (1, 1)


async def test_shed_and_abandoned_tasks_are_counted_and_the_gauges_return_to_zero(
    reader: InMemoryMetricReader, meter_provider: MeterProvider
) -> None:
    started = anyio.Event()

    async def running() -> None:
        started.set()
        await anyio.sleep_forever()

    async def queued() -> None:
        raise AssertionError("never starts")

    async def endpoint(request: Request) -> PlainTextResponse:
        collector = request.state.after_response
        collector.options(name="running").add(running)
        collector.options(name="queued").add(queued)
        collector.options(name="extra").add(queued)  # no room: max_pending=1 is taken
        collector.options(name="extra").add(queued)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]),
        meter_provider=meter_provider,
        max_concurrency=1,
        max_pending=1,
        shutdown_timeout=0.05,
        task_timeout=None,
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        await started.wait()
        metrics = metrics_by_name(reader)
        # Every task name added so far has its gauges, 0 included.
        assert gauges(metrics["after_response.task.running"]) == {
            ("running",): 1,
            ("queued",): 0,
            ("extra",): 0,
        }
        assert gauges(metrics["after_response.task.pending"]) == {
            ("running",): 0,
            ("queued",): 1,
            ("extra",): 0,
        }
    # Leaving serve_uvicorn ran lifespan shutdown: its drain deadline passed, both abandoned.

    metrics = metrics_by_name(reader)
    assert sums(metrics["after_response.task.finished"]) == {
        ("extra", "shed"): 2,
        ("running", "abandoned"): 1,
        ("queued", "abandoned"): 1,
    }
    assert set(gauge_values(metrics["after_response.task.pending"])) == {0}
    assert set(gauge_values(metrics["after_response.task.running"])) == {0}
    stats = middleware.stats()
    assert (stats.shed, stats.abandoned, stats.pending, stats.running) == (2, 2, 0, 0)


@pytest.mark.parametrize(
    "max_pending",
    [
        pytest.param(10_000, id="its slot given back"),
        pytest.param(0, id="its slot kept: no room among the pending"),
    ],
)
async def test_gauges_count_a_task_waiting_to_retry_as_pending_not_running(
    reader: InMemoryMetricReader, meter_provider: MeterProvider, max_pending: int
) -> None:
    failed_once = anyio.Event()
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            failed_once.set()
            raise ConnectionError("once")

    async def endpoint(request: Request) -> PlainTextResponse:
        request.state.after_response.options(
            name="flaky", retry=Retry(attempts=2, backoff=60, jitter=0)
        ).add(flaky)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]),
        meter_provider=meter_provider,
        max_pending=max_pending,
        shutdown_timeout=0.05,
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        await failed_once.wait()  # the task now sleeps in its backoff
        assert middleware.stats().running == (1 if max_pending == 0 else 0)  # the slot
        metrics = metrics_by_name(reader)
        assert sums(metrics["after_response.task.pending"]) == {("flaky",): 1}
        assert set(gauge_values(metrics["after_response.task.running"])) == {0}
    metrics = metrics_by_name(reader)
    assert set(gauge_values(metrics["after_response.task.pending"])) == {0}
    assert sums(metrics["after_response.task.finished"]) == {("flaky", "abandoned"): 1}


async def test_instruments_have_the_documented_names_units_and_kinds(
    reader: InMemoryMetricReader, meter_provider: MeterProvider
) -> None:
    calls = 0

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("once")

    async def endpoint(request: Request) -> PlainTextResponse:
        collector = request.state.after_response
        collector.options(retry=Retry(attempts=2, backoff=0, jitter=0)).add(flaky)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]), meter_provider=meter_provider
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=10)

    metrics = metrics_by_name(reader)
    described = {
        name: (
            metric.unit,
            type(metric.data).__name__,
            getattr(metric.data, "is_monotonic", None),
        )
        for name, metric in metrics.items()
    }
    assert described == {
        "after_response.task.added": ("{task}", "Sum", True),
        "after_response.task.finished": ("{task}", "Sum", True),
        "after_response.task.retries": ("{attempt}", "Sum", True),
        "after_response.task.duration": ("s", "Histogram", None),
        "after_response.task.queue.duration": ("s", "Histogram", None),
        "after_response.task.pending": ("{task}", "Sum", False),
        "after_response.task.running": ("{task}", "Sum", False),
    }
    assert all(metric.description for metric in metrics.values())
    for name in ("after_response.task.duration", "after_response.task.queue.duration"):
        data = metrics[name].data
        assert isinstance(data, Histogram)
        # Second-sized buckets: the SDK's default boundaries (0, 5, 10, ... 10000) assume ms.
        assert {tuple(p.explicit_bounds) for p in data.data_points} == {SECONDS_BUCKETS}


async def test_tasks_added_before_the_sdk_is_set_up_are_in_no_metric(
    monkeypatch: pytest.MonkeyPatch, reader: InMemoryMetricReader, meter_provider: MeterProvider
) -> None:
    """The global SDK provider configured after the middleware was built, and after tasks
    had started and queued: a task is measured if metrics were on when it was added, so
    those are in no metric, not counted down from gauges that never counted them up (which
    agree with stats() once everything has ended)."""
    from opentelemetry.metrics import _internal as global_metrics

    from after_response import _telemetry

    monkeypatch.setattr(global_metrics, "_METER_PROVIDER", None)  # no SDK yet: the proxy
    monkeypatch.setattr(_telemetry, "_RECHECK_SECONDS", 0.0)  # look at the provider each task
    release = anyio.Event()

    async def gated() -> None:
        await release.wait()

    middleware = AfterResponseMiddleware(app_adding_n(gated), max_concurrency=1)
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/?n=3")  # one running, two queued: counted by no SDK
        monkeypatch.setattr(global_metrics, "_METER_PROVIDER", meter_provider)
        await client.get("/?n=1")  # picked up here: this one is counted
        assert middleware.stats().pending == 3
        release.set()
        assert await middleware.drain(timeout=5)
        metrics = metrics_by_name(reader)
    assert set(gauge_values(metrics["after_response.task.pending"])) == {0}
    assert set(gauge_values(metrics["after_response.task.running"])) == {0}
    assert list(sums(metrics["after_response.task.added"]).values()) == [1]
    assert list(sums(metrics["after_response.task.finished"]).values()) == [1]
    assert list(histogram_counts(metrics["after_response.task.duration"]).values()) == [1]


async def test_durable_tasks_stored_and_taken_over_are_counted_by_name(
    tmp_path: Path, reader: InMemoryMetricReader, meter_provider: MeterProvider
) -> None:
    """``stored`` counts what requests committed to the store; ``recovered`` what this
    process took over from one that died (two rows left running by a gone owner)."""
    path = tmp_path / "after_response.sqlite3"
    ledger = str(tmp_path / "ledger.jsonl")
    store = SQLiteStore(path)
    await store.open("the-dead-process")
    await store.save(
        [
            StoredTask(
                id=f"orphan-{n}",
                name="record",
                target="tests.durable_tasks:record",
                args=[ledger, "buyer@example.com"],
                kwargs={"code": str(n)},
                state="running",
                attempt=1,
                owner="gone",
            )
            for n in range(2)
        ]
    )
    await store.close()

    async def endpoint(request: Request) -> PlainTextResponse:
        request.state.after_response.options(durable=True).add(
            durable_tasks.record, ledger, "buyer@example.com", code="new"
        )
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]),
        store=SQLiteStore(path),
        meter_provider=meter_provider,
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        await until(lambda: middleware.stats().succeeded == 3, 5, "the three tasks to run")
        metrics = metrics_by_name(reader)
    assert sums(metrics["after_response.task.stored"]) == {("record",): 1}
    assert sums(metrics["after_response.task.recovered"]) == {("record",): 2}
    assert sums(metrics["after_response.task.finished"]) == {("record", "succeeded"): 3}


def app_adding_n(effect: Any) -> Starlette:
    """A Starlette app whose GET /?n=N adds ``effect`` N times."""

    async def endpoint(request: Request) -> PlainTextResponse:
        for _ in range(int(request.query_params["n"])):
            request.state.after_response.add(effect)
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/", endpoint)])
