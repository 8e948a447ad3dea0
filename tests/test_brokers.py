"""The broker fixtures work: a real Redis, real Celery and taskiq workers, real ``kill -9``.

A task published by name from the test runs in the engine's own worker process; a task whose
worker is killed mid-run is delivered again (Celery: ``acks_late`` and
``reject_on_worker_lost``; taskiq: a Redis stream acknowledged after execution) and keeps its id.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from celery import Celery
from taskiq.acks import AcknowledgeType
from taskiq.kicker import AsyncKicker
from taskiq_redis import RedisStreamBroker

from tests.brokers import (
    LedgerLine,
    celery_worker,
    read_ledger,
    taskiq_worker,
    wait_for_ledger,
    wait_until,
)
from tests.engine_apps import CELERY_RECORD_TASK, TASKIQ_RECORD_TASK

CELERY_APP = "tests.engine_apps.celery_app"
TASKIQ_BROKER = "tests.engine_apps.taskiq_app:broker"
# Read from the message, not from the worker's registered task: the sender decides.
ACK_AFTER_EXECUTION = AcknowledgeType.WHEN_EXECUTED.value


@pytest.fixture
def celery_client(redis_url: str) -> Iterator[Celery]:
    """A publishing-only Celery app: it knows the task by name, not by import."""
    app = Celery("client", broker=redis_url)
    app.conf.broker_connection_retry_on_startup = True
    yield app
    app.close()


def send_celery(app: Celery, entry: str, task_id: str, gate: Path | None = None) -> None:
    app.send_task(
        CELERY_RECORD_TASK, args=[entry], kwargs={"gate": gate and str(gate)}, task_id=task_id
    )


def send_taskiq(redis_url: str, entry: str, task_id: str, gate: Path | None = None) -> None:
    async def kick() -> None:
        broker = RedisStreamBroker(redis_url)
        await broker.startup()  # declares the consumer group (see the engine notes)
        try:
            kicker: AsyncKicker[..., None] = AsyncKicker(
                TASKIQ_RECORD_TASK, broker, labels={"ack_type": ACK_AFTER_EXECUTION}
            )
            await kicker.with_task_id(task_id).kiq(entry, gate=gate and str(gate))
        finally:
            await broker.shutdown()

    anyio.run(kick)


def events(ledger: list[LedgerLine], event: str) -> list[LedgerLine]:
    return [line for line in ledger if line.event == event]


def test_celery_task_runs_in_the_real_worker(
    redis_url: str, celery_client: Celery, tmp_path: Path
) -> None:
    ledger_path = tmp_path / "ledger"
    task_id = str(uuid.uuid4())
    with celery_worker(CELERY_APP, redis_url, ledger=ledger_path) as worker:
        send_celery(celery_client, "receipt", task_id)
        ledger = wait_for_ledger(ledger_path, "done", "receipt")
    assert ledger == [
        LedgerLine("started", "receipt", task_id, worker.pid),
        LedgerLine("done", "receipt", task_id, worker.pid),
    ]


def test_taskiq_task_runs_in_the_real_worker(redis_url: str, tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger"
    task_id = str(uuid.uuid4())
    with taskiq_worker(TASKIQ_BROKER, redis_url, ledger=ledger_path) as worker:
        send_taskiq(redis_url, "receipt", task_id)
        ledger = wait_for_ledger(ledger_path, "done", "receipt")
    assert [line[:3] for line in ledger] == [
        ("started", "receipt", task_id),
        ("done", "receipt", task_id),
    ]
    assert ledger[0].pid != worker.pid  # it ran in taskiq's worker process, a child


def test_celery_task_of_a_killed_worker_runs_in_the_restarted_worker(
    redis_url: str, celery_client: Celery, tmp_path: Path
) -> None:
    ledger_path, gate = tmp_path / "ledger", tmp_path / "gate"
    task_id = str(uuid.uuid4())
    # Prefork: the solo pool runs the task inside kombu's read callback, which holds back even
    # an early acknowledgement until the task returns, so it would pass without acks_late.
    with celery_worker(CELERY_APP, redis_url, ledger=ledger_path, pool="prefork") as first:
        send_celery(celery_client, "receipt", task_id, gate)
        [first_run] = wait_for_ledger(ledger_path, "started", "receipt")
        first.kill()
    gate.touch()
    with celery_worker(CELERY_APP, redis_url, ledger=ledger_path, pool="prefork"):
        ledger = wait_for_ledger(ledger_path, "done", "receipt")
    [_, second_run] = events(ledger, "started")
    [done] = events(ledger, "done")
    assert first_run.task_id == second_run.task_id == done.task_id == task_id
    assert second_run.pid == done.pid != first_run.pid


def test_celery_task_of_a_killed_pool_process_is_requeued(
    redis_url: str, celery_client: Celery, tmp_path: Path
) -> None:
    ledger_path, gate = tmp_path / "ledger", tmp_path / "gate"
    task_id = str(uuid.uuid4())
    with celery_worker(CELERY_APP, redis_url, ledger=ledger_path, pool="prefork") as worker:
        send_celery(celery_client, "receipt", task_id, gate)
        [started] = wait_for_ledger(ledger_path, "started", "receipt")
        os.kill(started.pid, signal.SIGKILL)  # the pool process, not the worker
        gate.touch()
        ledger = wait_for_ledger(ledger_path, "done", "receipt")
        assert worker.process.poll() is None
    [first, second] = events(ledger, "started")
    [done] = events(ledger, "done")
    assert first.task_id == second.task_id == done.task_id == task_id
    assert second.pid == done.pid != first.pid


def test_taskiq_task_of_a_killed_worker_runs_in_the_restarted_worker(
    redis_url: str, tmp_path: Path
) -> None:
    ledger_path, gate = tmp_path / "ledger", tmp_path / "gate"
    task_id = str(uuid.uuid4())
    with taskiq_worker(TASKIQ_BROKER, redis_url, ledger=ledger_path) as first:
        send_taskiq(redis_url, "receipt", task_id, gate)
        wait_for_ledger(ledger_path, "started", "receipt")
        first.kill()
    gate.touch()
    with taskiq_worker(TASKIQ_BROKER, redis_url, ledger=ledger_path):
        # taskiq-redis looks for abandoned messages (XAUTOCLAIM) only after a read that
        # returned new ones: on an idle stream the killed worker's task would never come back.
        def run_again_after_a_nudge() -> bool:
            send_taskiq(redis_url, "nudge", str(uuid.uuid4()))
            return any(line[:2] == ("done", "receipt") for line in read_ledger(ledger_path))

        wait_until(
            run_again_after_a_nudge,
            timeout=20,
            interval=0.25,
            waiting_for=lambda: (
                f"the killed worker's task to run again: {read_ledger(ledger_path)}"
            ),
        )
    ledger = [line for line in read_ledger(ledger_path) if line.entry == "receipt"]
    [first_run, second_run] = events(ledger, "started")
    [done] = events(ledger, "done")
    assert first_run.task_id == second_run.task_id == done.task_id == task_id
    assert second_run.pid == done.pid != first_run.pid
