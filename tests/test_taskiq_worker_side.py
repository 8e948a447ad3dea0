"""The taskiq engine's worker side, run in the test process against a real Redis.

``tests/test_taskiq_engine.py`` runs these pieces in real ``taskiq worker`` processes, which
coverage does not measure (they are killed at teardown). Here the same code runs in pytest: the
runner task's function through taskiq's own ``Receiver.run_task`` (its dependency injection
builds the ``Context``), the worker startup/shutdown events of a ``RedisStreamBroker`` that
start and stop ``wake_claimers``, and ``wake_claimers`` through a Redis outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest
import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from redis.asyncio import Redis
from taskiq import TaskiqEvents, TaskiqMessage, TaskiqResult, TaskiqState
from taskiq.exceptions import SendTaskError
from taskiq.receiver import Receiver
from taskiq_redis import RedisStreamBroker

from after_response._engine import RUNNER_TASK, Message, encode
from after_response._store import StoredTask
from after_response._taskiq_send import ACK_AFTER_EXECUTION, wake_claimers
from after_response._worker import WorkerRunner
from after_response.taskiq import TaskiqEngine, _runner_task
from tests import worker_effects
from tests.brokers import redis_server

pytestmark = pytest.mark.anyio

#: Milliseconds a delivered message waits unacknowledged before a worker may claim it.
IDLE_TIMEOUT_MS = 100
#: The bound of every poll here (``wake_claimers`` looks every 0.5 s at the least).
POLL_TIMEOUT = 10.0
POLL_INTERVAL = 0.02
STREAM = "taskiq"  # RedisStreamBroker's default queue_name and consumer_group_name


@pytest.fixture(autouse=True)
def seen() -> Iterator[list[tuple[str, str, int, bool]]]:
    worker_effects.SEEN.clear()
    yield worker_effects.SEEN
    worker_effects.SEEN.clear()


def greet_message(
    labels: dict[str, str], *, stored_trace: dict[str, str] | None = None
) -> TaskiqMessage:
    """A runner task message for ``tests.worker_effects:greet("ada")``, as a worker receives it."""
    task_id = str(uuid.uuid4())
    row = StoredTask(id=task_id, name="greet", target="tests.worker_effects:greet", args=["ada"])
    body = encode(row, stored_trace or {})
    return TaskiqMessage(
        task_id=task_id, task_name=RUNNER_TASK, labels=labels, args=[body], kwargs={}
    )


async def run_in_receiver(
    broker: RedisStreamBroker, function: Callable[..., Awaitable[str]], message: TaskiqMessage
) -> TaskiqResult[Any]:
    """Run ``function`` for ``message`` as a taskiq worker does (parameters, ``Context``)."""
    result: TaskiqResult[Any] = await Receiver(broker, run_startup=False).run_task(
        function, message
    )
    assert not result.is_err, result.error
    return result


def carrier_of(span: trace.Span) -> dict[str, str]:
    """The W3C headers of ``span`` (what the labels or the stored body carry)."""
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def side_effect_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    spans = [span for span in exporter.get_finished_spans() if span.name.startswith("after_")]
    assert [span.name for span in spans] == ["after_response greet"]
    return spans[0]


async def poll_until(condition: Callable[[], Awaitable[bool]], waiting_for: str) -> None:
    """Poll ``condition`` until it holds; ``TimeoutError`` naming ``waiting_for`` after
    ``POLL_TIMEOUT`` seconds."""
    deadline = anyio.current_time() + POLL_TIMEOUT
    while not await condition():
        if anyio.current_time() > deadline:
            raise TimeoutError(f"still waiting after {POLL_TIMEOUT} s for {waiting_for}")
        await anyio.sleep(POLL_INTERVAL)


def wakers() -> list[asyncio.Task[Any]]:
    """The ``wake_claimers`` tasks running on this loop."""
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") == "wake_claimers"
    ]


async def abandon_a_message(client: Redis) -> None:
    """Deliver a message to a consumer that never acknowledges it (a killed worker)."""
    await client.xadd(STREAM, {"data": b"abandoned"})
    await client.xreadgroup(STREAM, "killed-worker", {STREAM: ">"}, count=1)


async def test_the_registered_runner_task_runs_a_message_and_returns_its_outcome(
    redis_url: str, seen: list[Any]
) -> None:
    broker = RedisStreamBroker(redis_url, unacknowledged_lock_timeout=30)
    engine = TaskiqEngine(broker)
    task = broker.find_task(RUNNER_TASK)
    assert task is not None
    message = greet_message({})
    result = await run_in_receiver(broker, task.original_func, message)
    assert result.return_value == "succeeded"
    assert seen == [("greet hello ada", message.task_id, 1, False)]
    stats = engine.runner.stats()
    assert (stats.received, stats.succeeded, stats.redelivered) == (1, 1, 0)


@pytest.fixture
def traced(
    redis_url: str, tracer_provider: TracerProvider
) -> tuple[RedisStreamBroker, Callable[..., Awaitable[str]]]:
    """A broker and the runner task's function of a runner on the test's tracer provider
    (the engine's own runner reports to the global one)."""
    broker = RedisStreamBroker(redis_url, unacknowledged_lock_timeout=30)
    return broker, _runner_task(WorkerRunner("taskiq", tracer_provider=tracer_provider))


async def test_with_no_span_current_the_side_effect_continues_the_trace_of_the_labels(
    traced: tuple[RedisStreamBroker, Callable[..., Awaitable[str]]],
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    broker, function = traced
    tracer = tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("request") as request:
        stored = carrier_of(request)
    with tracer.start_as_current_span("taskiq publish") as publish:
        labels = carrier_of(publish)
    assert "tracestate" not in labels  # only the labels that are there are read
    assert not trace.get_current_span().get_span_context().is_valid
    result = await run_in_receiver(broker, function, greet_message(labels, stored_trace=stored))
    assert result.return_value == "succeeded"
    span = side_effect_span(exporter)
    assert span.parent is not None
    assert span.parent.span_id == publish.get_span_context().span_id
    assert span.context.trace_id == publish.get_span_context().trace_id


async def test_without_trace_labels_the_side_effect_continues_the_stored_trace(
    traced: tuple[RedisStreamBroker, Callable[..., Awaitable[str]]],
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    broker, function = traced
    with tracer_provider.get_tracer("test").start_as_current_span("request") as request:
        stored = carrier_of(request)
    await run_in_receiver(broker, function, greet_message({}, stored_trace=stored))
    span = side_effect_span(exporter)
    assert span.parent is not None
    assert span.parent.span_id == request.get_span_context().span_id


async def test_a_span_current_in_the_worker_is_the_parent_rather_than_the_labels(
    traced: tuple[RedisStreamBroker, Callable[..., Awaitable[str]]],
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    broker, function = traced
    tracer = tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("taskiq publish") as publish:
        labels = carrier_of(publish)
    # As taskiq's OpenTelemetryMiddleware does: the consumer span continues the labels.
    with tracer.start_as_current_span("taskiq consumer") as consumer:
        await run_in_receiver(broker, function, greet_message(labels))
    span = side_effect_span(exporter)
    assert span.parent is not None
    assert span.parent.span_id == consumer.get_span_context().span_id


async def test_a_worker_sends_a_wake_up_only_while_a_message_waits_past_idle_timeout(
    redis_url: str, seen: list[Any]
) -> None:
    broker = RedisStreamBroker(
        redis_url, idle_timeout=IDLE_TIMEOUT_MS, unacknowledged_lock_timeout=30
    )
    engine = TaskiqEngine(broker)
    broker.is_worker_process = True
    await broker.startup()  # WORKER_STARTUP: the consumer group, and the waker
    async with Redis.from_url(redis_url) as client:
        try:
            assert len(wakers()) == 1

            async def looked() -> bool:
                stats = await client.info("commandstats")
                return "cmdstat_xpending" in stats

            await poll_until(looked, "the waker's first XPENDING")
            assert await client.xlen(STREAM) == 0  # nothing waits: nothing sent

            await abandon_a_message(client)

            async def woken() -> bool:
                return bool(await client.xlen(STREAM) >= 2)

            await poll_until(woken, "a wake-up message in the stream")
            [(_, fields)] = await client.xrevrange(STREAM, count=1) or []
            data = (fields or {})[b"data"]
            assert isinstance(data, bytes)
            wake_up = broker.formatter.loads(data)
            assert wake_up.task_name == RUNNER_TASK
            assert wake_up.labels["ack_type"] == ACK_AFTER_EXECUTION
            task = broker.find_task(RUNNER_TASK)
            assert task is not None
            result = await run_in_receiver(broker, task.original_func, wake_up)
            assert result.return_value == "woken"
            assert engine.runner.stats().received == 0
            assert seen == []
        finally:
            await broker.shutdown()  # WORKER_SHUTDOWN: the waker is cancelled
    assert wakers() == []
    await broker.shutdown()  # a second shutdown has no waker to stop


@contextlib.asynccontextmanager
async def dropping_server() -> AsyncIterator[tuple[int, list[int]]]:
    """A server on 127.0.0.1 that closes every connection at once (a Redis going away);
    yields its port and a list that grows by one per connection."""
    connections: list[int] = []

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    async with server:
        yield port, connections


async def test_the_waker_warns_once_while_redis_is_away_and_resumes_when_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with dropping_server() as (port, connections):
        broker = RedisStreamBroker(f"redis://127.0.0.1:{port}/0", idle_timeout=IDLE_TIMEOUT_MS)
        with caplog.at_level(logging.WARNING, logger="after_response"):
            waker = asyncio.ensure_future(wake_claimers(broker))

            async def warned() -> bool:
                return bool(caplog.records)

            await poll_until(warned, "the waker's warning")
            first = len(connections)

            async def failed_twice() -> bool:
                # A third look has started: the second one failed and was handled.
                return len(connections) > 2 * first

            await poll_until(failed_twice, "two failed looks")
    try:
        [record] = caplog.records
        assert record.getMessage().startswith(
            "taskiq engine: cannot look for messages of dead workers (ConnectionError: "
        )
        assert record.getMessage().endswith("trying again every 0.5 s")
        with redis_server(port) as url:
            with redis.Redis.from_url(url) as setup:
                setup.xgroup_create(STREAM, STREAM, id="$", mkstream=True)
            async with Redis.from_url(url) as client:
                await abandon_a_message(client)

                async def woken() -> bool:
                    return bool(await client.xlen(STREAM) >= 2)

                await poll_until(woken, "a wake-up message once Redis is back")
    finally:
        waker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waker
        await broker.connection_pool.disconnect()


async def test_a_failed_start_leaves_a_broker_the_app_started_to_the_app() -> None:
    with redis_server() as url:
        broker = RedisStreamBroker(url, unacknowledged_lock_timeout=30)
        shutdowns: list[TaskiqState] = []
        broker.add_event_handler(TaskiqEvents.CLIENT_SHUTDOWN, shutdowns.append)
        engine = TaskiqEngine(broker)
        await broker.startup()  # the app's own startup, before the relay's start()
    with pytest.raises(redis.exceptions.ConnectionError):
        await engine.start()  # Redis is gone
    # Still the app's started broker: publish() tries to send, and stop() leaves it be.
    body = greet_message({}).args[0]
    with pytest.raises(SendTaskError):
        await engine.publish([Message(body["id"], "greet", body, {})])
    await engine.stop()
    assert shutdowns == []
    await broker.shutdown()
    assert len(shutdowns) == 1
