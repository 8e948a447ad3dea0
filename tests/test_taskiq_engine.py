"""The taskiq engine against a real Redis and real ``taskiq worker`` processes.

The test process plays the web process: it publishes through ``TaskiqEngine.publish`` as the
relay does; the worker runs ``tests.engine_apps.taskiq_engine_app:broker``, whose module
constructs the engine (so the runner task is registered) and runs the side effects of
``tests.engine_apps.effects``, which write ``EVENT ENTRY TASK_ID PID ATTEMPT`` ledger lines.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import uuid
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import pytest
import redis
from opentelemetry import propagate
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from taskiq import (
    AsyncBroker,
    BrokerMessage,
    InMemoryBroker,
    TaskiqEvents,
    TaskiqMessage,
    TaskiqMiddleware,
    TaskiqState,
)
from taskiq.exceptions import SendTaskError
from taskiq.kicker import AsyncKicker
from taskiq.middlewares.opentelemetry_middleware import OpenTelemetryMiddleware
from taskiq_redis import ListQueueBroker, PubSubBroker, RedisStreamBroker, RedisStreamSentinelBroker

from after_response._engine import RUNNER_TASK, Engine, Message, encode
from after_response._store import StoredTask
from after_response.taskiq import TaskiqEngine
from tests.brokers import (
    Worker,
    assert_one_failure_line_and_a_count,
    read_effects,
    redis_server,
    taskiq_worker,
    wait_for_effect,
    wait_until,
)
from tests.engine_apps import LOG_INTERVAL_ENV, spans

BROKER = "tests.engine_apps.taskiq_engine_app:broker"
# Names from tests/engine_apps/taskiq_engine_app.py (which reads its environment on import).
OTEL_MIDDLEWARE_ENV = "AFTER_RESPONSE_TEST_TASKIQ_OTEL"
STATS_TASK = "engine_apps.taskiq.stats"
EFFECTS = "tests.engine_apps.effects"
OPTIONS: dict[str, Any] = {"timeout": 5, "retry": {"attempts": 3, "backoff": 0.05}}


def message(
    function: str,
    *args: Any,
    kwargs: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Message:
    """A message for ``tests.engine_apps.effects:<function>``, as the relay builds it."""
    task_id = str(uuid.uuid4())
    row = StoredTask(
        id=task_id,
        name=function,
        target=f"{EFFECTS}:{function}",
        args=list(args),
        kwargs=kwargs or {},
        options=OPTIONS if options is None else options,
    )
    return Message(task_id, function, encode(row, headers or {}), dict(headers or {}))


async def publish_async(
    redis_url: str, *messages: Message, tracer_provider: TracerProvider | None = None
) -> None:
    """start(), publish(), stop() of an engine of a broker of this (web) process."""
    broker = RedisStreamBroker(redis_url, unacknowledged_lock_timeout=30)
    if tracer_provider is not None:
        broker.add_middlewares(OpenTelemetryMiddleware(tracer_provider=tracer_provider))
    engine = TaskiqEngine(broker)
    await engine.start()
    try:
        await engine.publish(messages)
    finally:
        await engine.stop()


def publish(redis_url: str, *messages: Message) -> None:
    anyio.run(lambda: publish_async(redis_url, *messages))


def kick(redis_url: str, task_name: str, *args: Any) -> None:
    """Send a test app's own task (not a side effect)."""

    async def send() -> None:
        broker = RedisStreamBroker(redis_url)
        await broker.startup()
        try:
            await AsyncKicker(task_name, broker, {}).kiq(*args)
        finally:
            await broker.shutdown()

    anyio.run(send)


def worker_stats(redis_url: str, directory: Path) -> dict[str, int]:
    """The worker process's ``engine.runner.stats()``, through the app's stats task."""
    path = directory / f"stats-{uuid.uuid4().hex}.json"
    kick(redis_url, STATS_TASK, str(path))
    wait_until(path.exists, timeout=20, waiting_for=lambda: f"the worker's stats in {path}")
    stats: dict[str, int] = json.loads(path.read_text(encoding="utf-8"))
    return stats


def pending(redis_url: str) -> int:
    """Messages delivered to the workers' consumer group and not acknowledged."""
    with redis.Redis.from_url(redis_url) as client:
        summary: dict[str, Any] = client.xpending("taskiq", "taskiq")
        return int(summary["pending"])


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after if after[name] != before[name]}


def stop_quickly(worker: Worker) -> None:
    """Skip the fixture's SIGTERM wait: a RedisStreamBroker worker never exits on SIGTERM."""
    worker.kill()


class SharedWorker(NamedTuple):
    redis_url: str
    ledger: Path
    directory: Path
    worker: Worker


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedWorker]:
    """One Redis and one worker for the tests that do not kill or reconfigure it."""
    directory = tmp_path_factory.mktemp("taskiq-engine")
    ledger = directory / "ledger"
    with redis_server() as url, taskiq_worker(BROKER, url, ledger=ledger) as worker:
        yield SharedWorker(url, ledger, directory, worker)
        stop_quickly(worker)


def test_published_side_effects_run_in_the_worker_under_the_message_id(
    shared: SharedWorker,
) -> None:
    plain = message("record_effect", "plain")
    coroutine = message("arecord_effect", "coroutine")
    keywords = message("record_effect", kwargs={"entry": "keywords", "gate": None})
    publish(shared.redis_url, plain, coroutine, keywords)

    for sent, entry in [(plain, "plain"), (coroutine, "coroutine"), (keywords, "keywords")]:
        [*_, done] = wait_for_effect(shared.ledger, "done", entry)
        assert (done.task_id, done.attempt) == (sent.id, 1)
        assert done.pid != shared.worker.pid  # taskiq's worker process, a child


def test_concurrent_publishes_of_one_engine_all_run(shared: SharedWorker) -> None:
    batches = [[message("arecord_effect", f"batch{b}-{n}") for n in range(5)] for b in range(3)]

    async def publish_concurrently() -> None:
        engine = TaskiqEngine(RedisStreamBroker(shared.redis_url, unacknowledged_lock_timeout=30))
        await engine.start()
        try:
            async with anyio.create_task_group() as group:
                for batch in batches:
                    group.start_soon(engine.publish, batch)
        finally:
            await engine.stop()

    anyio.run(publish_concurrently)
    for b, batch in enumerate(batches):
        for n, sent in enumerate(batch):
            [done] = wait_for_effect(shared.ledger, "done", f"batch{b}-{n}")
            assert done.task_id == sent.id


def test_a_failing_side_effect_is_retried_in_the_worker_per_its_policy(
    shared: SharedWorker,
) -> None:
    before = worker_stats(shared.redis_url, shared.directory)
    flaky, exhausted = message("flaky_effect", "flaky", 2), message("flaky_effect", "spent", 9)
    publish(shared.redis_url, flaky, exhausted)

    lines = wait_for_effect(shared.ledger, "done", "flaky")
    assert [(line.event, line.attempt, line.task_id) for line in lines] == [
        ("failed", 1, flaky.id),
        ("failed", 2, flaky.id),
        ("done", 3, flaky.id),
    ]
    [dead] = wait_for_effect(shared.ledger, "dead-failed", "flaky_effect")
    assert (dead.task_id, dead.attempt) == (exhausted.id, 3)
    spent = [line for line in read_effects(shared.ledger) if line.entry == "spent"]
    assert [(line.event, line.attempt) for line in spent] == [("failed", n) for n in (1, 2, 3)]
    after = worker_stats(shared.redis_url, shared.directory)
    assert delta(before, after) == {"received": 2, "retried": 4, "succeeded": 1, "failed": 1}
    wait_until(lambda: pending(shared.redis_url) == 0, timeout=5, waiting_for=lambda: "the ack")


def test_a_side_effect_past_its_timeout_is_timed_out_and_counted(shared: SharedWorker) -> None:
    before = worker_stats(shared.redis_url, shared.directory)
    slow = message("slow_effect", "slow", 2.0, options={"timeout": 0.2, "retry": {"attempts": 1}})
    publish(shared.redis_url, slow)

    wait_for_effect(shared.ledger, "started", "slow")
    timed_out = "timed out after 0.2s (attempt 1/1); its worker thread cannot be stopped"
    wait_until(
        lambda: f"{timed_out} and runs on [task {slow.id}]" in shared.worker.output(),
        timeout=20,
        waiting_for=lambda: f"a timed out log line:\n{shared.worker.output()[-2000:]}",
    )
    after = worker_stats(shared.redis_url, shared.directory)
    assert delta(before, after) == {"received": 1, "timed_out": 1}
    [dead] = wait_for_effect(shared.ledger, "dead-timed_out", "slow_effect")
    assert (dead.task_id, dead.attempt) == (slow.id, 1)
    wait_until(lambda: pending(shared.redis_url) == 0, timeout=5, waiting_for=lambda: "the ack")


def test_a_burst_of_failures_in_a_worker_is_one_traceback_and_a_count(tmp_path: Path) -> None:
    """A downstream is down: every side effect of a burst fails in the worker. One line in
    full with its traceback, the others counted; the worker's interval is an hour here, so
    the count is the one it writes as it stops."""
    ledger = tmp_path / "ledger"
    once = {"timeout": 5, "retry": {"attempts": 1}}
    burst = [message("flaky_effect", "down", 99, options=once) for _ in range(10)]
    with (
        redis_server() as url,
        taskiq_worker(BROKER, url, ledger=ledger, environment={LOG_INTERVAL_ENV: "3600"}) as w,
    ):
        publish(url, *burst)
        wait_for_effect(ledger, "dead-failed", "flaky_effect", count=10)
        w.stop()
        output = w.output()
    assert_one_failure_line_and_a_count(output, "flaky_effect", len(burst))


def test_a_side_effect_the_worker_cannot_import_is_logged_and_acknowledged(
    shared: SharedWorker,
) -> None:
    before = worker_stats(shared.redis_url, shared.directory)
    missing = message("no_such_effect", "missing")
    publish(shared.redis_url, missing)

    wait_until(
        lambda: f"({missing.id})" in shared.worker.output(),
        timeout=20,
        waiting_for=lambda: f"a log line about {missing.id}:\n{shared.worker.output()[-2000:]}",
    )
    assert f"{EFFECTS}:no_such_effect cannot be imported" in shared.worker.output()
    wait_until(lambda: pending(shared.redis_url) == 0, timeout=5, waiting_for=lambda: "the ack")
    after = worker_stats(shared.redis_url, shared.directory)
    assert delta(before, after) == {"received": 1, "failed": 1}


def test_a_malformed_body_is_logged_and_acknowledged(shared: SharedWorker) -> None:
    before = worker_stats(shared.redis_url, shared.directory)
    secret = "card-4242424242424242"
    publish(shared.redis_url, Message(str(uuid.uuid4()), "bad", {"not": secret}, {}))

    wait_until(
        lambda: "not an after-response message body" in shared.worker.output(),
        timeout=20,
        waiting_for=lambda: f"a log line about the body:\n{shared.worker.output()[-2000:]}",
    )
    wait_until(lambda: pending(shared.redis_url) == 0, timeout=5, waiting_for=lambda: "the ack")
    after = worker_stats(shared.redis_url, shared.directory)
    assert delta(before, after) == {"received": 1, "failed": 1}
    assert secret not in shared.worker.output()


def publish_gated_receipt(redis_url: str, tmp_path: Path) -> tuple[Path, Path, Message]:
    """Publish a side effect that writes ``started``, waits for the gate file to exist, then
    writes ``done``; its ledger, its gate, its message. Published before any worker runs:
    start() declared the consumer group, so it waits."""
    ledger, gate = tmp_path / "ledger", tmp_path / "gate"
    receipt = message("record_effect", "receipt", str(gate))
    publish(redis_url, receipt)
    return ledger, gate, receipt


def test_the_task_of_a_killed_worker_runs_again_with_the_same_id_on_a_quiet_stream(
    redis_url: str, tmp_path: Path
) -> None:
    ledger, gate, receipt = publish_gated_receipt(redis_url, tmp_path)
    with taskiq_worker(BROKER, redis_url, ledger=ledger) as first:
        [first_run] = wait_for_effect(ledger, "started", "receipt")
        first.kill()
    gate.touch()
    with taskiq_worker(BROKER, redis_url, ledger=ledger) as second:
        # Nothing else is published: the engine's wake-up message, sent by the worker once the
        # task has been abandoned for idle_timeout, makes it claim the task back.
        wait_for_effect(ledger, "done", "receipt")
        stop_quickly(second)
    [again, done] = [line for line in read_effects(ledger) if line.entry == "receipt"][1:]
    assert first_run.task_id == again.task_id == done.task_id == receipt.id
    assert again.pid == done.pid != first_run.pid


def test_sigterm_lets_the_running_side_effect_finish_then_the_worker_exits(
    redis_url: str, tmp_path: Path
) -> None:
    ledger, gate, receipt = publish_gated_receipt(redis_url, tmp_path)
    with taskiq_worker(BROKER, redis_url, ledger=ledger) as worker:
        [started] = wait_for_effect(ledger, "started", "receipt")
        worker.process.send_signal(signal.SIGTERM)  # to the main process, as systemd's does
        gate.touch()
        assert worker.process.wait(worker.stop_timeout) == 0  # exited, not killed
    [again, done] = [line for line in read_effects(ledger) if line.entry == "receipt"]
    assert (again, done.event, done.pid) == (started, "done", started.pid)
    assert done.task_id == receipt.id


@pytest.mark.parametrize(
    ("web_otel", "worker_otel"),
    [(False, False), (True, True), (True, False), (False, True)],
    ids=["no-taskiq-otel", "taskiq-otel", "taskiq-otel-in-web-only", "taskiq-otel-in-worker-only"],
)
def test_the_worker_span_continues_the_trace_of_the_publish(
    redis_url: str,
    tmp_path: Path,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    web_otel: bool,
    worker_otel: bool,
) -> None:
    ledger, worker_spans = tmp_path / "ledger", tmp_path / "spans.jsonl"
    environment = {spans.SPANS_ENV: str(worker_spans), OTEL_MIDDLEWARE_ENV: str(int(worker_otel))}
    tracer = tracer_provider.get_tracer("test")

    def chain() -> tuple[str, list[str]] | None:
        """The trace id of the side effect's span and the names of its ancestors, once
        every span of the chain is exported (each process exports a span when it ends)."""
        web = {
            format(s.context.span_id, "016x"): (
                s.name,
                s.parent and format(s.parent.span_id, "016x"),
            )
            for s in exporter.get_finished_spans()
        }
        exported = spans.read(worker_spans)
        workers = {s["span_id"]: (s["name"], s["parent_id"]) for s in exported}
        known = {**web, **workers}
        effects = [s for s in exported if s["name"] == "after_response record_effect"]
        if not effects:
            return None
        [effect] = effects
        assert effect["attributes"]["after_response.task.id"] == traced.id
        names, span_id = [], effect["parent_id"]
        while span_id is not None:
            if span_id not in known:
                return None
            name, span_id = known[span_id]
            names.append(name)
        return effect["trace_id"], names

    with taskiq_worker(BROKER, redis_url, ledger=ledger, environment=environment) as worker:
        with tracer.start_as_current_span("request") as request_span:
            headers: dict[str, str] = {}
            propagate.inject(headers)
        traced = message("record_effect", "traced", headers=headers)
        web_provider = tracer_provider if web_otel else None
        anyio.run(lambda: publish_async(redis_url, traced, tracer_provider=web_provider))
        wait_until(
            lambda: chain() is not None,
            timeout=20,
            waiting_for=lambda: f"the worker's spans in {spans.read(worker_spans)}",
        )
        stop_quickly(worker)

    expected = [f"execute/{RUNNER_TASK}"] if worker_otel else []
    expected += [f"send/{RUNNER_TASK}"] if web_otel else []
    trace_id = format(request_span.get_span_context().trace_id, "032x")
    assert chain() == (trace_id, [*expected, "request"])


@pytest.mark.anyio
async def test_publish_leaves_the_callers_trace_context_as_it_was(
    redis_url: str, tracer_provider: TracerProvider
) -> None:
    tracer = tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("relay") as relay_span:
        headers: dict[str, str] = {}
        with tracer.start_as_current_span("request"):
            propagate.inject(headers)
        engine = TaskiqEngine(RedisStreamBroker(redis_url, unacknowledged_lock_timeout=30))
        await engine.start()
        await engine.publish([message("record_effect", "traced", headers=headers)])
        await engine.stop()
        assert otel_trace.get_current_span() is relay_span


def stream_entries(redis_url: str) -> list[bytes]:
    """The bytes of every message in the broker's stream, oldest first."""
    with redis.Redis.from_url(redis_url) as client:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange("taskiq")
        return [fields[b"data"] for _, fields in entries]


class LabellingMiddleware(TaskiqMiddleware):
    """An async ``pre_send`` that adds a label; a ``post_send`` that records the task id."""

    def __init__(self, fail_on: str | None = None) -> None:
        super().__init__()
        self.fail_on = fail_on
        self.sent: list[str] = []

    async def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        if message.task_id == self.fail_on:
            raise LookupError("refused by a middleware")
        message.labels["tenant"] = "blue"
        return message

    def post_send(self, message: TaskiqMessage) -> None:
        self.sent.append(message.task_id)


@pytest.mark.anyio
async def test_a_batch_sends_the_bytes_the_kicker_sends(redis_url: str) -> None:
    batch = [
        message("record_effect", f"bytes{n}", headers={"tracestate": f"k={n}"}) for n in (1, 2)
    ]
    middleware = LabellingMiddleware()
    broker = RedisStreamBroker(redis_url, unacknowledged_lock_timeout=30).with_middlewares(
        middleware
    )
    engine = TaskiqEngine(broker)
    await engine.start()
    await engine.publish(batch)
    published = stream_entries(redis_url)
    with redis.Redis.from_url(redis_url) as client:
        client.delete("taskiq")
    for sent in batch:
        labels: dict[str, Any] = {**sent.headers, "ack_type": "when_executed"}
        kicker: AsyncKicker[[dict[str, Any]], str] = AsyncKicker(RUNNER_TASK, broker, labels)
        await kicker.with_task_id(sent.id).kiq(sent.body)
    await engine.stop()

    assert published == stream_entries(redis_url)
    assert json.loads(published[0])["labels"]["tenant"] == "blue"  # the middleware ran
    assert sorted(middleware.sent) == sorted([sent.id for sent in batch] * 2)


@pytest.mark.anyio
async def test_each_producer_span_of_a_batch_is_parented_under_its_own_message(
    redis_url: str, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = tracer_provider.get_tracer("test")
    broker = RedisStreamBroker(redis_url, unacknowledged_lock_timeout=30)
    broker.add_middlewares(OpenTelemetryMiddleware(tracer_provider=tracer_provider))
    engine = TaskiqEngine(broker)
    await engine.start()
    requests, batch = [], []
    for n in range(3):
        with tracer.start_as_current_span(f"request{n}") as request_span:
            headers: dict[str, str] = {}
            propagate.inject(headers)
        requests.append(request_span.get_span_context())
        batch.append(message("record_effect", f"traced{n}", headers=headers))
    with tracer.start_as_current_span("relay") as relay_span:
        await engine.publish(batch)
        assert otel_trace.get_current_span() is relay_span
    await engine.stop()

    producers = {
        span.attributes["messaging.message.id"]: span
        for span in exporter.get_finished_spans()
        if span.name == f"send/{RUNNER_TASK}" and span.attributes
    }
    entries = [json.loads(data) for data in stream_entries(redis_url)]
    assert [entry["task_id"] for entry in entries] == [sent.id for sent in batch]
    for sent, request, entry in zip(batch, requests, entries, strict=True):
        producer = producers[sent.id]
        assert producer.kind is otel_trace.SpanKind.PRODUCER
        assert producer.parent is not None
        assert (producer.parent.trace_id, producer.parent.span_id) == (
            request.trace_id,
            request.span_id,
        )
        # The worker continues the trace from the producer span.
        assert f"{producer.context.span_id:016x}" in entry["labels"]["traceparent"]


@pytest.mark.anyio
async def test_a_batch_a_middleware_refuses_sends_nothing_and_restores_the_context(
    redis_url: str, tracer_provider: TracerProvider
) -> None:
    tracer = tracer_provider.get_tracer("test")
    batch = [message("record_effect", f"refused{n}") for n in range(3)]
    refusing = LabellingMiddleware(fail_on=batch[1].id)
    broker = RedisStreamBroker(redis_url, unacknowledged_lock_timeout=30).with_middlewares(
        OpenTelemetryMiddleware(tracer_provider=tracer_provider), refusing
    )
    engine = TaskiqEngine(broker)
    await engine.start()
    with tracer.start_as_current_span("relay") as relay_span:
        with pytest.raises(LookupError, match="refused by a middleware"):
            await engine.publish(batch)
        assert otel_trace.get_current_span() is relay_span
    await engine.stop()
    assert stream_entries(redis_url) == []
    assert refusing.sent == []  # as AsyncKicker: no post_send for what was not sent


class KickingBroker(RedisStreamBroker):
    """A stream broker with a ``kick`` of its own (it records the task ids)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, unacknowledged_lock_timeout=30)
        self.kicked: list[str] = []

    async def kick(self, message: BrokerMessage) -> None:
        self.kicked.append(message.task_id)
        await super().kick(message)


@pytest.mark.anyio
async def test_a_broker_with_its_own_kick_gets_one_kick_per_message(redis_url: str) -> None:
    batch = [message("record_effect", f"kicked{n}") for n in range(3)]
    broker = KickingBroker(redis_url)
    engine = TaskiqEngine(broker)
    await engine.start()
    await engine.publish(batch)
    await engine.stop()
    assert broker.kicked == [sent.id for sent in batch]
    assert [json.loads(data)["task_id"] for data in stream_entries(redis_url)] == broker.kicked


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers: a hung broker."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


@pytest.mark.anyio
async def test_start_raises_when_nothing_listens() -> None:
    engine = TaskiqEngine(RedisStreamBroker(f"redis://127.0.0.1:{_closed_port()}/0"))
    with pytest.raises(redis.exceptions.ConnectionError):
        await engine.start()
    await engine.stop()


@pytest.mark.anyio
async def test_start_raises_timeout_error_when_the_broker_hangs(silent_server: str) -> None:
    engine = TaskiqEngine(RedisStreamBroker(silent_server), publish_timeout=0.5)
    with pytest.raises(TimeoutError, match=r"did not answer within publish_timeout=0\.5 s"):
        await engine.start()
    with pytest.raises(RuntimeError, match=r"publish\(\) before start\(\)"):
        await engine.publish([message("record_effect", "never")])


@pytest.mark.anyio
async def test_publish_raises_timeout_error_when_the_broker_hangs(redis_url: str) -> None:
    engine = TaskiqEngine(RedisStreamBroker(redis_url), publish_timeout=0.5)
    await engine.start()
    with redis.Redis.from_url(redis_url) as client:
        client.execute_command("CLIENT", "PAUSE", "5000", "WRITE")  # XADD blocks for 5 s
        try:
            with pytest.raises(TimeoutError, match="did not take 2 message"):
                await engine.publish([message("record_effect", "hung")] * 2)
        finally:
            client.execute_command("CLIENT", "UNPAUSE")
    await engine.stop()


@pytest.mark.anyio
async def test_publish_raises_once_the_broker_is_gone() -> None:
    with redis_server() as url:
        engine = TaskiqEngine(RedisStreamBroker(url))
        await engine.start()
        await engine.publish([message("record_effect", "before")])
    with pytest.raises(SendTaskError) as raised:
        await engine.publish([message("record_effect", "after")])
    assert isinstance(raised.value.__cause__, redis.exceptions.ConnectionError)
    await engine.stop()
    await engine.stop()  # idempotent


@pytest.mark.parametrize("kind", [ListQueueBroker, PubSubBroker])
def test_a_broker_without_acknowledgements_is_refused(kind: type[RedisStreamBroker]) -> None:
    with pytest.raises(TypeError, match=f"cannot use a {kind.__name__}.*RedisStreamBroker"):
        TaskiqEngine(kind("redis://127.0.0.1:1/0"))


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ((object(),), TypeError, "expects a taskiq broker, got object"),
        ((RedisStreamBroker("redis://127.0.0.1:1/0"),), None, None),
    ],
)
def test_bad_constructor_arguments_are_refused(
    arguments: tuple[Any, ...], error: type[Exception] | None, match: str | None
) -> None:
    if error is None:
        engine: Engine = TaskiqEngine(*arguments)  # mypy: the Engine protocol
        assert isinstance(engine, Engine)
        assert engine.system == "taskiq"
    else:
        with pytest.raises(error, match=match):
            TaskiqEngine(*arguments)


@pytest.mark.parametrize(
    ("timeout", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (float("inf"), ValueError),
        (float("nan"), ValueError),
        ("10", TypeError),
        (True, TypeError),
    ],
)
def test_a_bad_publish_timeout_is_refused(timeout: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="publish_timeout must be a positive number"):
        TaskiqEngine(RedisStreamBroker("redis://127.0.0.1:1/0"), publish_timeout=timeout)


@pytest.mark.parametrize(
    ("interval", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (float("nan"), ValueError),
        ("5", TypeError),
        (None, TypeError),
    ],
)
def test_a_bad_log_interval_is_refused_and_leaves_the_broker_as_it_was(
    interval: Any, error: type[Exception]
) -> None:
    broker = RedisStreamBroker("redis://127.0.0.1:1/0")
    with pytest.raises(error, match="log_interval must be a positive number"):
        TaskiqEngine(broker, log_interval=interval)
    TaskiqEngine(broker)  # the refused one registered nothing


def test_an_async_dead_letter_hook_is_refused() -> None:
    async def hook(letter: object) -> None: ...

    with pytest.raises(TypeError, match="on_dead_letter must be a plain"):
        TaskiqEngine(RedisStreamBroker("redis://127.0.0.1:1/0"), on_dead_letter=hook)


def test_a_second_engine_on_the_same_broker_is_refused() -> None:
    broker = RedisStreamBroker("redis://127.0.0.1:1/0")
    TaskiqEngine(broker)
    with pytest.raises(ValueError, match=r"already has the 'after_response\.run' task"):
        TaskiqEngine(broker)
    TaskiqEngine(RedisStreamBroker("redis://127.0.0.1:1/0"))  # another broker: its own


@pytest.mark.anyio
async def test_startup_warns_once_about_settings_that_lose_redelivery(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = TaskiqEngine(RedisStreamBroker(redis_url, maxlen=1000))
    with caplog.at_level(logging.WARNING, logger="after_response"):
        engine.check()
        await engine.start()  # retried while the broker is down: no warnings again
    await engine.stop()
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2
    assert "unacknowledged_lock_timeout=None" in warnings[0]
    assert "set unacknowledged_lock_timeout" in warnings[0]
    assert "RedisStreamBroker(maxlen=1000)" in warnings[1]


@pytest.mark.anyio
async def test_startup_does_not_warn_about_a_well_configured_broker(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = TaskiqEngine(RedisStreamBroker(redis_url, unacknowledged_lock_timeout=30))
    with caplog.at_level(logging.WARNING, logger="after_response"):
        engine.check()
        await engine.start()
    await engine.stop()
    assert caplog.records == []


def test_startup_warns_that_an_in_memory_broker_is_for_tests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = TaskiqEngine(InMemoryBroker())
    with caplog.at_level(logging.WARNING, logger="after_response"):
        engine.check()
    assert "InMemoryBroker runs the side effects in this process" in caplog.text


@pytest.mark.anyio
@pytest.mark.parametrize("app_started_it", [False, True])
async def test_stop_shuts_down_only_a_broker_start_started(
    redis_url: str, app_started_it: bool
) -> None:
    broker = RedisStreamBroker(redis_url, unacknowledged_lock_timeout=30)
    shutdowns = []

    def count(state: TaskiqState) -> None:
        shutdowns.append(state)

    broker.add_event_handler(TaskiqEvents.CLIENT_SHUTDOWN, count)
    engine = TaskiqEngine(broker)
    if app_started_it:
        await broker.startup()
    await engine.start()
    await engine.stop()
    await engine.stop()
    assert len(shutdowns) == (0 if app_started_it else 1)
    if app_started_it:
        await broker.shutdown()


class UncheckedBroker(AsyncBroker):
    """A broker after-response knows nothing of (say, another project's)."""

    async def kick(self, message: BrokerMessage) -> None:
        raise NotImplementedError

    def listen(self) -> AsyncGenerator[bytes, None]:
        raise NotImplementedError


def test_startup_warns_that_it_cannot_check_an_unknown_broker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = TaskiqEngine(UncheckedBroker())
    with caplog.at_level(logging.WARNING, logger="after_response"):
        engine.check()
    assert "cannot check that a UncheckedBroker redelivers" in caplog.text


def test_startup_warns_that_a_sentinel_stream_broker_never_claims_messages_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = RedisStreamSentinelBroker(sentinels=[("127.0.0.1", _closed_port())], master_name="m")
    engine = TaskiqEngine(broker, publish_timeout=0.5)
    with caplog.at_level(logging.WARNING, logger="after_response"):
        engine.check()  # no sentinel answers: nothing connects
    assert "RedisStreamSentinelBroker acknowledges after execution but never claims" in caplog.text
