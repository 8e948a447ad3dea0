"""``CeleryEngine`` against a real Redis and real Celery workers (prefork pools).

The test is the web process: it publishes messages built as the relay builds them
(``_engine.encode``) through the engine; the worker is ``celery -A
tests.engine_apps.celery_engine_app worker``, where the same engine's runner runs the side
effects of ``tests.engine_apps.effects``, which write ``EVENT ENTRY TASK_ID PID ATTEMPT``
lines to a ledger.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from celery import Celery, signals
from kombu.exceptions import (  # type: ignore[attr-defined]  # kombu 5.7's, not in the stubs
    BatchPublishError,
    OperationalError,
)
from opentelemetry import propagate
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from after_response import EngineConfigurationError
from after_response._engine import RUNNER_TASK, Engine, Message, encode
from after_response._store import StoredTask
from after_response.celery import CeleryEngine
from tests.brokers import (
    assert_one_failure_line_and_a_count,
    celery_worker,
    redis_server,
    wait_for_effect,
    wait_until,
)
from tests.engine_apps import LOG_INTERVAL_ENV, spans

APP = "tests.engine_apps.celery_engine_app"
EFFECTS = "tests.engine_apps.effects"
OPTIONS: dict[str, Any] = {"timeout": 5, "retry": {"attempts": 3, "backoff": 0.05}}
# Read by the worker app (which the tests never import: it reads its settings at import).
INSTRUMENT_ENV = "AFTER_RESPONSE_TEST_CELERY_INSTRUMENT"
# What a broker that is down raises: the Redis client's, kombu's (a batch's send among them),
# or our timeout's error.
BROKER_ERRORS = (
    redis.exceptions.ConnectionError,
    OperationalError,
    BatchPublishError,
    TimeoutError,
)
# kombu's Redis transport: messages delivered and not yet acknowledged.
UNACKED = "unacked"


def message(
    entry: str,
    function: str = "record_effect",
    *args: Any,
    kwargs: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Message:
    """A message as the relay publishes it; ``entry`` is the side effect's name and first
    argument."""
    row = StoredTask(
        id=str(uuid.uuid4()),
        name=entry,
        target=f"{EFFECTS}:{function}",
        args=[entry, *args],
        kwargs=kwargs or {},
        options=options or OPTIONS,
    )
    return Message(row.id, row.name, encode(row, headers or {}), headers or {})


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "ledger"


@asynccontextmanager
async def started(url: str, **options: Any) -> AsyncIterator[CeleryEngine]:
    """A web process's engine on an app of its own, started; stopped after."""
    app = Celery("web", broker=url)
    engine = CeleryEngine(app, **options)
    with anyio.fail_after(30):
        await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()
        app.close()


def worker(url: str, ledger: Path, **environment: str) -> Any:
    return celery_worker(APP, url, ledger=ledger, pool="prefork", environment=environment)


def broker_is_drained(url: str) -> bool:
    """Nothing waits in the default queue and nothing is delivered but unacknowledged."""
    client = redis.Redis.from_url(url)
    try:
        return client.llen("celery") == 0 and client.hlen(UNACKED) == 0
    finally:
        client.close()


# 1. Publish: a real worker runs the side effect under the message's id.


@pytest.mark.anyio
async def test_published_side_effects_run_in_the_worker_under_the_message_id(
    redis_url: str, ledger: Path, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    sync = message("receipt", "record_effect", kwargs={"gate": str(gate)})
    async_ = message("areceipt", "arecord_effect")
    with worker(redis_url, ledger) as running:
        async with started(redis_url) as engine:
            await engine.publish([async_, sync])
        [async_done] = wait_for_effect(ledger, "done", "areceipt")
        # The keyword argument arrived: the sync side effect waits for its gate.
        [started_line] = wait_for_effect(ledger, "started", "receipt")
        gate.touch()
        [_, done] = wait_for_effect(ledger, "done", "receipt")
        wait_until(
            lambda: broker_is_drained(redis_url),
            timeout=10,
            waiting_for=lambda: "the messages to be acknowledged",
        )
    assert started_line[:3] == ("started", "receipt", sync.id)
    assert done[:3] == ("done", "receipt", sync.id)
    assert async_done[:3] == ("done", "areceipt", async_.id)
    assert done.pid != running.pid  # a prefork pool process ran it
    assert done.attempt == async_done.attempt == 1


# 2. The worker runs the side effect with its Retry policy and timeout; a message it cannot
# run is logged and acknowledged, never redelivered.


@pytest.mark.anyio
async def test_a_failing_side_effect_is_retried_in_the_worker_by_its_policy(
    redis_url: str, ledger: Path
) -> None:
    flaky = message("flaky", "flaky_effect", 2)
    with worker(redis_url, ledger):
        async with started(redis_url) as engine:
            await engine.publish([flaky])
        lines = wait_for_effect(ledger, "done", "flaky")
    assert [(line.event, line.attempt) for line in lines] == [
        ("failed", 1),
        ("failed", 2),
        ("done", 3),
    ]
    assert {line.task_id for line in lines} == {flaky.id}
    assert len({line.pid for line in lines}) == 1  # retried within one delivery


@pytest.mark.anyio
async def test_a_side_effect_past_its_timeout_times_out_and_is_dead_lettered(
    redis_url: str, ledger: Path, tmp_path: Path
) -> None:
    span_file = tmp_path / "spans"
    slow = message("slow", "slow_effect", 3.0, options={"timeout": 0.2, "retry": {"attempts": 1}})
    with worker(redis_url, ledger, **{spans.SPANS_ENV: str(span_file)}) as running:
        async with started(redis_url) as engine:
            await engine.publish([slow])
        wait_for_effect(ledger, "dead-timed_out", "slow")
        wait_until(
            lambda: broker_is_drained(redis_url),
            timeout=10,
            waiting_for=lambda: "the timed-out message to be acknowledged",
        )
        output = running.output()
    [span] = [s for s in spans.read(span_file) if s["name"] == "after_response slow"]
    assert span["attributes"]["after_response.task.outcome"] == "timed_out"
    assert span["attributes"]["after_response.task.id"] == slow.id
    assert "3.0" not in output  # the argument is never logged


@pytest.mark.anyio
@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
async def test_a_burst_of_failures_in_a_worker_is_one_traceback_and_a_count(
    redis_url: str, ledger: Path, pool: str
) -> None:
    """A downstream is down: every side effect of a burst fails in the worker. One line in
    full with its traceback, the others counted; the worker's interval is an hour here, so
    the count is the one the runner writes as it stops (a prefork pool's process on
    worker_process_shutdown, a solo or threads worker on worker_shutdown)."""
    once = {"timeout": 5, "retry": {"attempts": 1}}
    burst = [message("down", "flaky_effect", 99, options=once) for _ in range(10)]
    environment = {LOG_INTERVAL_ENV: "3600"}
    with celery_worker(
        APP, redis_url, ledger=ledger, pool=pool, environment=environment
    ) as running:
        async with started(redis_url) as engine:
            await engine.publish(burst)
        wait_for_effect(ledger, "dead-failed", "down", count=10)
        running.stop()
        output = running.output()
    assert_one_failure_line_and_a_count(output, "down", len(burst))


@pytest.mark.anyio
async def test_a_side_effect_that_cannot_be_imported_is_logged_and_acknowledged(
    redis_url: str, ledger: Path
) -> None:
    missing = message("missing", "no_such_effect", "a-secret-argument")
    after = message("after")
    with worker(redis_url, ledger) as running:
        async with started(redis_url) as engine:
            await engine.publish([missing])
            wait_until(
                lambda: "cannot be imported" in running.output(),
                timeout=20,
                waiting_for=lambda: f"the import error in the worker log:\n{running.output()}",
            )
            wait_until(
                lambda: broker_is_drained(redis_url),
                timeout=10,
                waiting_for=lambda: "the unrunnable message to be acknowledged",
            )
            # The worker goes on serving.
            await engine.publish([after])
            wait_for_effect(ledger, "done", "after")
        output = running.output()
    assert missing.id in output
    assert f"{EFFECTS}:no_such_effect" in output
    assert "a-secret-argument" not in output


@pytest.mark.anyio
async def test_a_malformed_body_is_logged_and_acknowledged(redis_url: str, ledger: Path) -> None:
    malformed = Message(str(uuid.uuid4()), "malformed", {"not": "ours"}, {})
    with worker(redis_url, ledger) as running:
        async with started(redis_url) as engine:
            await engine.publish([malformed])
        wait_until(
            lambda: "not an after-response message body" in running.output(),
            timeout=20,
            waiting_for=lambda: f"the bad body in the worker log:\n{running.output()}",
        )
        wait_until(
            lambda: broker_is_drained(redis_url),
            timeout=10,
            waiting_for=lambda: "the malformed message to be acknowledged",
        )


@pytest.mark.anyio
async def test_messages_go_to_the_engines_queue(redis_url: str) -> None:
    first = message("first", "record_effect", "a-secret-argument")
    async with started(redis_url, queue="handoff") as engine:
        await engine.publish([first, message("second")])
    client = redis.Redis.from_url(redis_url)
    try:
        assert (client.llen("handoff"), client.llen("celery")) == (2, 0)
        raw = client.lindex("handoff", -1)  # the first one published
    finally:
        client.close()
    assert raw is not None
    published = json.loads(raw)
    assert published["headers"]["id"] == first.id
    # Celery's argument preview (shown in its events and in Flower) holds no user data.
    assert "a-secret-argument" not in published["headers"]["argsrepr"]


def queued_headers(url: str) -> list[dict[str, Any]]:
    """The Celery headers of the messages waiting in the default queue, oldest first."""
    client = redis.Redis.from_url(url)
    try:
        raws = client.lrange("celery", 0, -1)
    finally:
        client.close()
    return [json.loads(raw)["headers"] for raw in reversed(raws)]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("transport_options", "queued_before_each"),
    [({}, [0, 0, 0, 0]), ({"retry_on_timeout": True}, [0, 1, 2, 3])],
    ids=["one-pipeline", "retry-on-timeout-one-at-a-time"],
)
async def test_a_batch_reaches_redis_in_one_pipeline_unless_the_client_retries_writes(
    redis_url: str, transport_options: dict[str, Any], queued_before_each: list[int]
) -> None:
    # A Redis client that retries on timeout could replay a pipeline that went through,
    # doubling its messages: kombu then publishes each message at once.
    client = redis.Redis.from_url(redis_url)
    queued: list[int] = []

    def count_queued(sender: object = None, **_: object) -> None:
        if sender == RUNNER_TASK:
            queued.append(client.llen("celery"))

    batch = [message(f"effect-{index}") for index in range(4)]
    app = Celery("web", broker=redis_url)
    app.conf.broker_transport_options = transport_options
    engine = CeleryEngine(app)
    signals.before_task_publish.connect(count_queued, weak=False)
    try:
        await engine.start()
        await engine.publish(batch)
    finally:
        signals.before_task_publish.disconnect(count_queued)
        await engine.stop()
        client.close()
    assert queued == queued_before_each
    assert [headers["id"] for headers in queued_headers(redis_url)] == [m.id for m in batch]


@pytest.mark.anyio
async def test_the_apps_task_routes_route_each_message(redis_url: str) -> None:
    app = Celery("web", broker=redis_url)
    app.conf.task_routes = {RUNNER_TASK: {"queue": "routed"}}
    engine = CeleryEngine(app)
    await engine.start()
    try:
        await engine.publish([message("first"), message("second")])
    finally:
        await engine.stop()
    client = redis.Redis.from_url(redis_url)
    try:
        assert (client.llen("routed"), client.llen("celery")) == (2, 0)
    finally:
        client.close()


# 3. kill -9 of a worker mid-task: the message comes back and runs under the same id, and
# the runner knows it is a redelivery (kombu's Redis transport marks a restored message).


def redelivered_span(span_file: Path, entry: str) -> dict[str, Any]:
    [span] = [s for s in spans.read(span_file) if s["name"] == f"after_response {entry}"]
    return span


@pytest.mark.anyio
async def test_a_killed_workers_side_effect_runs_again_in_the_next_worker_under_its_id(
    redis_url: str, ledger: Path, tmp_path: Path
) -> None:
    gate, span_file = tmp_path / "gate", tmp_path / "spans"
    receipt = message("receipt", "record_effect", str(gate))
    with worker(redis_url, ledger, **{spans.SPANS_ENV: str(span_file)}) as first:
        async with started(redis_url) as engine:
            await engine.publish([receipt])
        wait_for_effect(ledger, "started", "receipt")
        first.kill()
    gate.touch()
    with worker(redis_url, ledger, **{spans.SPANS_ENV: str(span_file)}):
        lines = wait_for_effect(ledger, "done", "receipt")
    [first_run, second_run, done] = lines
    assert first_run.event == second_run.event == "started"
    assert first_run.task_id == second_run.task_id == done.task_id == receipt.id
    assert second_run.pid == done.pid != first_run.pid
    # Only the second run ended its span (the first one's process was killed).
    assert redelivered_span(span_file, "receipt")["attributes"]["after_response.task.recovered"]


@pytest.mark.anyio
async def test_a_killed_pool_processs_side_effect_is_requeued_and_runs_again(
    redis_url: str, ledger: Path, tmp_path: Path
) -> None:
    gate, span_file = tmp_path / "gate", tmp_path / "spans"
    receipt = message("receipt", "record_effect", str(gate))
    with worker(redis_url, ledger, **{spans.SPANS_ENV: str(span_file)}) as running:
        async with started(redis_url) as engine:
            await engine.publish([receipt])
        [started_line] = wait_for_effect(ledger, "started", "receipt")
        os.kill(started_line.pid, signal.SIGKILL)  # the pool process, not the worker
        gate.touch()
        lines = wait_for_effect(ledger, "done", "receipt")
        assert running.process.poll() is None
    [first_run, second_run, done] = lines
    assert first_run.task_id == second_run.task_id == done.task_id == receipt.id
    assert second_run.pid == done.pid != first_run.pid
    assert redelivered_span(span_file, "receipt")["attributes"]["after_response.task.recovered"]


def test_a_first_delivery_is_not_marked_recovered(
    redis_url: str, ledger: Path, tmp_path: Path
) -> None:
    span_file = tmp_path / "spans"
    receipt = message("receipt")

    async def publish() -> None:
        async with started(redis_url) as engine:
            await engine.publish([receipt])

    with worker(redis_url, ledger, **{spans.SPANS_ENV: str(span_file)}):
        anyio.run(publish)
        wait_for_effect(ledger, "done", "receipt")
        wait_until(
            lambda: bool(spans.read(span_file)),
            timeout=10,
            waiting_for=lambda: "the side effect's span",
        )
    attributes = redelivered_span(span_file, "receipt")["attributes"]
    assert "after_response.task.recovered" not in attributes


# 4. One trace: the worker's span continues the trace of the headers, with Celery's own
# instrumentation on both sides (publish and run spans in between) and without it.


def span_chain(start: dict[str, Any], spans_by_id: dict[str, dict[str, Any]]) -> list[str]:
    """The names of ``start`` and its ancestors, nearest first."""
    chain, span = [start["name"]], start
    while span["parent_id"] is not None and span["parent_id"] in spans_by_id:
        span = spans_by_id[span["parent_id"]]
        chain.append(span["name"])
    return chain


def as_record(span: Any) -> dict[str, Any]:
    return {
        "name": span.name,
        "trace_id": format(span.context.trace_id, "032x"),
        "span_id": format(span.context.span_id, "016x"),
        "parent_id": None if span.parent is None else format(span.parent.span_id, "016x"),
    }


@pytest.fixture
def celery_instrumented(tracer_provider: TracerProvider) -> Iterator[None]:
    """Celery's OpenTelemetry instrumentation in this (the publishing) process."""
    instrumentor = CeleryInstrumentor()  # type: ignore[no-untyped-call]
    instrumentor.instrument(tracer_provider=tracer_provider)
    yield
    instrumentor.uninstrument()


@pytest.mark.anyio
@pytest.mark.parametrize("instrumented", [False, True], ids=["ours", "celery-instrumentation"])
async def test_the_workers_span_is_in_the_publishers_trace(
    redis_url: str,
    ledger: Path,
    tmp_path: Path,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    request: pytest.FixtureRequest,
    instrumented: bool,
) -> None:
    if instrumented:
        request.getfixturevalue("celery_instrumented")
    span_file = tmp_path / "spans"
    with tracer_provider.get_tracer("test").start_as_current_span("request") as request_span:
        headers: dict[str, str] = {}
        propagate.inject(headers)
    traced = message("traced", headers=headers)
    environment = {spans.SPANS_ENV: str(span_file), INSTRUMENT_ENV: "1" if instrumented else "0"}
    with worker(redis_url, ledger, **environment):
        # Published outside the request's context, as the relay does: under the headers'.
        async with started(redis_url) as engine:
            await engine.publish([traced])
        wait_for_effect(ledger, "done", "traced")
        wait_until(
            lambda: any(s["name"] == "after_response traced" for s in spans.read(span_file)),
            timeout=10,
            waiting_for=lambda: f"the worker's span in {spans.read(span_file)}",
        )
    recorded = spans.read(span_file) + [as_record(s) for s in exporter.get_finished_spans()]
    by_id = {span["span_id"]: span for span in recorded}
    [worker_span] = [s for s in recorded if s["name"] == "after_response traced"]
    trace_id = format(request_span.get_span_context().trace_id, "032x")
    assert worker_span["trace_id"] == trace_id
    if instrumented:
        assert span_chain(worker_span, by_id) == [
            "after_response traced",
            f"run/{RUNNER_TASK}",
            f"apply_async/{RUNNER_TASK}",
            "request",
        ]
    else:
        assert span_chain(worker_span, by_id) == ["after_response traced", "request"]


@pytest.mark.anyio
@pytest.mark.usefixtures("celery_instrumented")
async def test_celery_instrumentation_publishes_each_message_of_a_batch_under_its_own_trace(
    redis_url: str, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracer = tracer_provider.get_tracer("test")
    batch, request_spans = [], []
    for entry in ("first", "second", "third"):
        with tracer.start_as_current_span(f"request {entry}") as request_span:
            headers: dict[str, str] = {}
            propagate.inject(headers)
        batch.append(message(entry, headers=headers))
        request_spans.append(request_span)
    async with started(redis_url) as engine:
        await engine.publish(batch)
    publish_spans = [
        span for span in exporter.get_finished_spans() if span.name == f"apply_async/{RUNNER_TASK}"
    ]
    assert [
        (s.context.trace_id, s.parent.span_id if s.parent else None) for s in publish_spans
    ] == [(r.get_span_context().trace_id, r.get_span_context().span_id) for r in request_spans]
    # Each message carries its own publish span's context to the worker.
    published = queued_headers(redis_url)
    assert [(h["id"], *h["traceparent"].split("-")[1:3]) for h in published] == [
        (m.id, f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}")
        for m, s in zip(batch, publish_spans, strict=True)
    ]


# 5. A broker that is down or hangs: start() and publish() raise, in bounded time.


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


@pytest.mark.anyio
async def test_start_raises_when_the_broker_is_down() -> None:
    app = Celery("web", broker=f"redis://127.0.0.1:{closed_port()}/0")
    engine = CeleryEngine(app, publish_timeout=2)
    # Refused, retried by the Redis client, and reported within publish_timeout.
    with anyio.fail_after(20), pytest.raises(BROKER_ERRORS):
        await engine.start()
    await engine.stop()


@pytest.mark.anyio
async def test_start_raises_timeout_error_when_the_broker_does_not_answer(
    silent_broker: str,
) -> None:
    engine = CeleryEngine(Celery("web", broker=silent_broker), publish_timeout=0.5)
    with anyio.fail_after(20), pytest.raises(TimeoutError, match="publish_timeout"):
        await engine.start()
    await engine.stop()


@pytest.mark.anyio
async def test_publish_raises_when_the_broker_has_stopped() -> None:
    with redis_server() as url:
        app = Celery("web", broker=url)
        engine = CeleryEngine(app, publish_timeout=2)
        await engine.start()
        await engine.publish([message("before")])
    try:
        with anyio.fail_after(20), pytest.raises(BROKER_ERRORS):
            await engine.publish([message("after")])
    finally:
        await engine.stop()


@pytest.mark.anyio
async def test_publish_before_start_and_after_stop_raises(redis_url: str) -> None:
    engine = CeleryEngine(Celery("web", broker=redis_url))
    with pytest.raises(RuntimeError, match="before start"):
        await engine.publish([message("early")])
    await engine.start()
    await engine.stop()
    await engine.stop()  # idempotent
    with pytest.raises(RuntimeError, match="before start"):
        await engine.publish([message("late")])


# 6. The settings check: an app that undoes the runner task's delivery settings.


@pytest.mark.anyio
async def test_startup_refuses_an_app_that_turns_off_late_acknowledgement() -> None:
    app = Celery("web", broker=f"redis://127.0.0.1:{closed_port()}/0")
    app.conf.task_annotations = {"*": {"acks_late": False, "reject_on_worker_lost": False}}
    engine = CeleryEngine(app)
    with pytest.raises(EngineConfigurationError, match=r"acks_late=False.*annotations") as raised:
        engine.check()
    assert "reject_on_worker_lost=False" in str(raised.value)
    with pytest.raises(EngineConfigurationError):
        await engine.start()


@pytest.mark.anyio
async def test_app_wide_acknowledgement_settings_do_not_change_the_runner_task(
    redis_url: str,
) -> None:
    app = Celery("web", broker=redis_url)
    app.conf.update(
        task_acks_late=False,
        task_reject_on_worker_lost=False,
        task_acks_on_failure_or_timeout=False,
    )
    engine = CeleryEngine(app)
    await engine.start()  # does not raise
    await engine.stop()
    task = app.tasks[RUNNER_TASK]
    assert (task.acks_late, task.reject_on_worker_lost, task.acks_on_failure_or_timeout) == (
        True,
        True,
        True,
    )


def test_a_worker_with_a_misconfigured_runner_task_says_so(redis_url: str, ledger: Path) -> None:
    with worker(redis_url, ledger, AFTER_RESPONSE_TEST_CELERY_MISCONFIGURE="1") as running:
        output = running.output()
    assert f"the {RUNNER_TASK} task has acks_late=False" in output
    assert "task_annotations" in output


# Construction.


def test_the_runner_task_is_registered_once_per_app() -> None:
    app = Celery("web")
    engine = CeleryEngine(app)
    assert app.tasks[RUNNER_TASK].name == RUNNER_TASK
    assert isinstance(engine, Engine)
    assert engine.system == "celery"
    assert engine.runner.stats().received == 0
    with pytest.raises(ValueError, match="already has a CeleryEngine"):
        CeleryEngine(app)


def test_an_engine_needs_a_celery_app() -> None:
    with pytest.raises(TypeError, match=r"expects a celery\.Celery app, got a str"):
        CeleryEngine("proj.celery:app")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"queue": 5}, TypeError, "queue"),
        ({"queue": ""}, TypeError, "queue"),
        ({"publish_timeout": 0}, ValueError, "publish_timeout"),
        ({"publish_timeout": float("nan")}, ValueError, "publish_timeout"),
        ({"publish_timeout": "10"}, TypeError, "publish_timeout.*got str"),
        ({"on_dead_letter": "print"}, TypeError, "on_dead_letter"),
        ({"log_interval": 0}, ValueError, "log_interval must be a positive number"),
        ({"log_interval": None}, TypeError, "log_interval must be a positive number"),
    ],
)
def test_bad_options_are_refused_at_construction(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        CeleryEngine(Celery("web"), **options)
