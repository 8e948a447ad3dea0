"""The outbox relay's edges, in-process with a real engine adapter whose broker is down (a
closed port): shutdown releases what it could not publish, still in the outbox; without
lifespan the relay does not run and durable tasks wait in the outbox. (Publishing for real,
and the restart that publishes the outbox, are in tests/test_engine_contract.py.)"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from taskiq_redis import RedisStreamBroker

from after_response import AfterResponseMiddleware, SQLiteStore
from after_response._store import OUTBOX, StoredTask
from after_response.taskiq import TaskiqEngine

from . import worker_effects
from .asgi import lifespan
from .brokers import free_port, redis_server
from .durable_process import until
from .test_metrics import metrics_by_name, sums
from .worker_effects import greet

pytestmark = pytest.mark.anyio


async def purchase(request: Request) -> PlainTextResponse:
    request.state.after_response.options(durable=True).add(greet, "ada@example.com")
    request.state.after_response.add(greet, "here")  # not durable: runs in this process
    return PlainTextResponse("ok")


def middleware(tmp_path: Path, port: int | None = None, **options: Any) -> AfterResponseMiddleware:
    """The purchase app with a store and a taskiq engine whose broker is on ``port`` (by
    default a closed one: the broker is down)."""
    broker = RedisStreamBroker(
        f"redis://127.0.0.1:{port or free_port()}/0", unacknowledged_lock_timeout=5
    )
    return AfterResponseMiddleware(
        Starlette(routes=[Route("/purchase", purchase, methods=["POST"])]),
        store=SQLiteStore(tmp_path / "store.sqlite3"),
        engine=TaskiqEngine(broker, publish_timeout=0.5),
        **options,
    )


async def outbox(path: Path) -> list[tuple[str, str | None]]:
    store = SQLiteStore(path)
    await store.open("test-reader")
    try:
        return [(row.state, row.owner) for row in store.list()]
    finally:
        await store.close()


async def test_shutdown_releases_what_the_broker_never_took_to_the_outbox(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = middleware(tmp_path, shutdown_timeout=0.5)
    transport = httpx.ASGITransport(app)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for _ in range(3):
            assert (await client.post("/purchase")).status_code == 200
        await until(lambda: app.stats().publish_failures >= 2, 10, "publishing retried")
        assert app.stats().pending == 3
    stats = app.stats()
    assert (stats.released, stats.handed_off, stats.pending) == (3, 0, 0)
    assert await outbox(tmp_path / "store.sqlite3") == [("outbox", None)] * 3
    assert "starting taskiq failed (" in caplog.text
    assert "released to the store" in caplog.text
    # Nothing is cancelled, nothing lost: a WARNING that says why, and no ERROR about it.
    [deadline] = [r for r in caplog.records if r.getMessage().startswith("shutdown: ")]
    assert (deadline.levelname, deadline.getMessage()) == (
        "WARNING",
        "shutdown: 3 durable after-response task(s) not yet published after "
        "shutdown_timeout=0.5s (is the broker down?); they go back to the store's outbox, "
        "for the next process to publish",
    )
    assert "ada@example.com" not in caplog.text


async def test_without_lifespan_durable_tasks_wait_in_the_outbox(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "after_response")
    app = middleware(tmp_path, shutdown_timeout=0.5)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/purchase")).status_code == 200
    assert app.stats().released == 1
    assert await outbox(tmp_path / "store.sqlite3") == [("outbox", None)]
    assert "waits in the outbox for a relay to publish it" in caplog.text


async def test_without_lifespan_and_without_engine_a_durable_task_is_stored_and_runs(
    tmp_path: Path,
) -> None:
    # The store is opened by the first request that stores (no lifespan startup opened it).
    app = AfterResponseMiddleware(
        Starlette(routes=[Route("/purchase", purchase, methods=["POST"])]),
        store=SQLiteStore(tmp_path / "store.sqlite3"),
    )
    seen_before = len(worker_effects.SEEN)
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/purchase")).status_code == 200
    assert app.stats().succeeded == 2
    assert len(worker_effects.SEEN) == seen_before + 2


async def test_the_relay_publishes_once_the_broker_comes_up_with_a_producer_span(
    tmp_path: Path,
) -> None:
    port = free_port()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    app = middleware(
        tmp_path,
        port,
        tracer_provider=provider,
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    transport = httpx.ASGITransport(app)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for _ in range(5):
            assert (await client.post("/purchase")).status_code == 200
        await until(lambda: app.stats().publish_failures >= 1, 10, "the broker is down")
        with redis_server(port):
            await until(lambda: app.stats().handed_off == 5, 30, "published once it is up")
            assert app.stats().pending == 0
    assert await outbox(tmp_path / "store.sqlite3") == [], "published rows without a key go"
    producers = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.PRODUCER]
    published = [span for span in producers if span.status.status_code is not StatusCode.ERROR]
    assert len(published) == 5
    attributes = published[0].attributes or {}
    assert attributes["messaging.system"] == "taskiq"
    assert attributes["after_response.task.outcome"] == "handed_off"
    finished = metrics_by_name(reader)["after_response.task.finished"]
    assert sums(finished) == {("greet", "handed_off"): 5, ("greet", "succeeded"): 5}


async def test_a_failed_publish_is_retried_and_the_outbox_of_a_dead_process_is_published(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A row a dead process left in the outbox (its owner never heartbeats here).
    path = tmp_path / "store.sqlite3"
    store = SQLiteStore(path)
    await store.open("dead-host:1:0000")
    await store.save(
        [
            StoredTask(
                id="orphan-1",
                name="greet",
                target="tests.worker_effects:greet",
                args=["bob@example.com"],
                state=OUTBOX,
                owner="dead-host:1:0000",
            )
        ]
    )
    await store.close()
    port = free_port()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = middleware(tmp_path, port, tracer_provider=provider)
    transport = httpx.ASGITransport(app)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with redis_server(port):
            await until(lambda: app.stats().handed_off == 1, 30, "the orphan is published")
            assert app.stats().recovered == 1
        # The broker goes away after the engine started: publishing itself fails.
        for _ in range(2):
            assert (await client.post("/purchase")).status_code == 200
        await until(lambda: app.stats().publish_failures >= 1, 10, "a publish failed")
        assert app.stats().pending == 2
        with redis_server(port):
            await until(lambda: app.stats().handed_off == 3, 30, "published once it is back")
    assert "publishing to taskiq failed (" in caplog.text
    assert "example.com" not in caplog.text
    failed = [
        span
        for span in exporter.get_finished_spans()
        if span.kind is SpanKind.PRODUCER and span.status.status_code is StatusCode.ERROR
    ]
    assert failed, "a failed publish leaves its PRODUCER span, marked as an error"
    assert all((span.attributes or {}).get("error.type") for span in failed)


async def test_a_broker_outage_holds_at_most_max_pending_in_memory_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The broker is down and more durable tasks come than max_pending: the relay keeps
    # max_pending of them in memory and releases the rest to the outbox (logged, counted).
    # The in-process queue stays empty: backpressure admits every request, plain tasks run.
    # Once the broker is up, every task is published once, the released ones claimed back.
    port = free_port()
    app = middleware(tmp_path, port, max_pending=2, overflow="backpressure", admission_timeout=0.5)
    transport = httpx.ASGITransport(app)
    async with lifespan(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for _ in range(5):
            assert (await client.post("/purchase")).status_code == 200
        await until(lambda: app.stats().succeeded == 5, 10, "the plain tasks ran")
        stats = app.stats()
        assert (stats.pending, stats.released) == (2, 3)
        rows = await outbox(tmp_path / "store.sqlite3")
        assert sorted(owner is None for _, owner in rows) == [False, False, True, True, True]
        with redis_server(port):
            await until(lambda: app.stats().handed_off == 5, 30, "all five published")
        assert app.stats().pending == 0
    assert await outbox(tmp_path / "store.sqlite3") == []
    assert "the engine's relay already holds max_pending=2 tasks" in caplog.text
    assert "ada@example.com" not in caplog.text
