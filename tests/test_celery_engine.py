"""``CeleryEngine`` against a real Redis and real Celery workers (prefork pools).

The test is the web process: it publishes messages built as the relay builds them
(``_engine.encode``) through the engine; the worker is ``celery -A
tests.engine_apps.celery_engine_app worker``, where the same engine's runner runs the side
effects of ``tests.engine_apps.effects``, which write ``EVENT ENTRY TASK_ID PID ATTEMPT``
lines to a ledger.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import pytest
import redis
from celery import Celery
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from after_response._engine import RUNNER_TASK, Message, encode
from after_response._store import StoredTask
from after_response.celery import CeleryEngine
from tests.brokers import Worker, celery_worker, redis_server, wait_until
from tests.engine_apps import spans

APP = "tests.engine_apps.celery_engine_app"
EFFECTS = "tests.engine_apps.effects"
OPTIONS: dict[str, Any] = {"timeout": 5, "retry": {"attempts": 3, "backoff": 0.05}}
# Read by the worker app (which the tests never import: it reads its settings at import).
INSTRUMENT_ENV = "AFTER_RESPONSE_TEST_CELERY_INSTRUMENT"
# kombu's Redis transport: messages delivered and not yet acknowledged.
UNACKED = "unacked"


class Line(NamedTuple):
    """A side effect's ledger line (``tests.engine_apps.effects``)."""

    event: str
    entry: str
    task_id: str
    pid: int
    attempt: int


def read_lines(ledger: Path) -> list[Line]:
    try:
        text = ledger.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            event, entry, task_id, pid, attempt = line.split()
            lines.append(Line(event, entry, task_id, int(pid), int(attempt)))
    return lines


def wait_for_line(ledger: Path, event: str, entry: str, *, count: int = 1) -> list[Line]:
    """The ledger's lines for ``entry``, once ``count`` of them are ``event``."""
    wait_until(
        lambda: sum(1 for line in read_lines(ledger) if line[:2] == (event, entry)) >= count,
        timeout=20,
        waiting_for=lambda: f"{count} x {event!r} {entry!r} in {read_lines(ledger)}",
    )
    return [line for line in read_lines(ledger) if line.entry == entry]


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
    redis_url: str, ledger: Path
) -> None:
    sync = message("receipt", "record_effect", kwargs={"gate": None})
    async_ = message("areceipt", "arecord_effect")
    with worker(redis_url, ledger) as running:
        async with started(redis_url) as engine:
            await engine.publish([sync, async_])
        [started_line, done] = wait_for_line(ledger, "done", "receipt")
        [async_done] = wait_for_line(ledger, "done", "areceipt")
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
        lines = wait_for_line(ledger, "done", "flaky")
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
    slow = message(
        "slow", "slow_effect", 3.0, options={"timeout": 0.2, "retry": {"attempts": 1}}
    )
    with worker(redis_url, ledger, **{spans.SPANS_ENV: str(span_file)}) as running:
        async with started(redis_url) as engine:
            await engine.publish([slow])
        wait_for_line(ledger, "dead-timed_out", "slow")
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
async def test_a_side_effect_that_cannot_be_imported_is_logged_and_acknowledged(
    redis_url: str, ledger: Path
) -> None:
    missing = message("missing", "no_such_effect")
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
            wait_for_line(ledger, "done", "after")
        output = running.output()
    assert missing.id in output
    assert f"{EFFECTS}:no_such_effect" in output


@pytest.mark.anyio
async def test_a_malformed_body_is_logged_and_acknowledged(
    redis_url: str, ledger: Path
) -> None:
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
