"""The engine contract, one suite for Celery and taskiq: a real ``redis-server``, real worker
processes started with their own command lines, the web app under a real ``uvicorn``.

What a user relies on when durable side effects are handed to an engine: each runs in a
worker, once per delivery, with its task id; nothing is lost when the web process is killed
before it could publish (the outbox) or the broker is down (the relay retries), or when a
worker is killed mid-task (redelivery, same id); one trace from the request to the worker;
and the books balance (``handed_off``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.brokers import (
    EffectLine,
    Worker,
    celery_worker,
    free_port,
    read_effects,
    redis_server,
    taskiq_worker,
)
from tests.durable_process import Load, ServerProcess, running, unfinished, until, wait_until
from tests.engine_apps import BROKER_URL_ENV, LEDGER_ENV
from tests.engine_apps import spans as span_files

pytestmark = [pytest.mark.parametrize("engine", ["celery", "taskiq"]), pytest.mark.anyio]

WEB_APP = "tests.engine_apps.web:app"
ENGINE_ENV = "AFTER_RESPONSE_TEST_ENGINE"  # read by tests.engine_apps.web


@dataclass
class Stack:
    """One test's files and processes: the store, the ledger, the span files."""

    engine: str
    broker_url: str
    tmp: Path

    @property
    def ledger(self) -> Path:
        return self.tmp / "ledger.txt"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            ENGINE_ENV: self.engine,
            BROKER_URL_ENV: self.broker_url,
            LEDGER_ENV: str(self.ledger),
            "AR_TEST_DB": str(self.tmp / "store.sqlite3"),
            **extra,
        }

    def web(self, **extra: str) -> AbstractContextManager[ServerProcess]:
        return running(self.env(**extra), app=WEB_APP)

    def worker(self, **extra: str) -> AbstractContextManager[Worker]:
        environment = {**self.env(), **extra}
        if self.engine == "celery":
            # prefork: a killed child is what acks_late + reject_on_worker_lost are about.
            return celery_worker(
                "tests.engine_apps.celery_engine_app",
                self.broker_url,
                pool="prefork",
                concurrency=2,
                ledger=self.ledger,
                environment=environment,
            )
        return taskiq_worker(
            "tests.engine_apps.taskiq_engine_app:broker",
            self.broker_url,
            ledger=self.ledger,
            environment=environment,
        )

    def runs(self) -> list[EffectLine]:
        return read_effects(self.ledger)

    def done(self, prefix: str = "order-") -> dict[str, list[EffectLine]]:
        """The ``done`` runs by entry."""
        by_entry: dict[str, list[EffectLine]] = {}
        for run in self.runs():
            if run.event == "done" and run.entry.startswith(prefix):
                by_entry.setdefault(run.entry, []).append(run)
        return by_entry


@pytest.fixture
def stack(engine: str, redis_url: str, tmp_path: Path) -> Stack:
    return Stack(engine, redis_url, tmp_path)


def purchase(server: ServerProcess, order: int, **params: str) -> None:
    response = httpx.post(f"{server.url}/purchase", params={"order": order, **params}, timeout=10.0)
    assert response.status_code == 200, response.text


def assert_books_balance(stats: dict[str, Any]) -> None:
    terminal = ("succeeded", "failed", "timed_out", "discarded", "shed", "abandoned")
    terminal += ("deduplicated", "released", "handed_off")
    parts = stats["collected"] + stats["pending"] + stats["running"]
    assert stats["added"] == parts + sum(stats[name] for name in terminal), stats


def test_durable_side_effects_run_in_the_worker_once_each_and_the_books_balance(
    stack: Stack,
) -> None:
    orders = range(1, 31)
    with stack.worker() as worker, stack.web() as web:
        web.wait_ready()
        for order in orders:
            purchase(web, order)
        wait_until(
            lambda: len(stack.done()) == len(orders) and len(stack.done("local-")) == len(orders),
            30,
            f"every order's receipt ran: {stack.done()}",
        )
        wait_until(lambda: web.stats()["handed_off"] == len(orders), 10, "all handed off")
        stats = web.stats()
        web.terminate()
        worker_output = worker.output()
    done = stack.done()
    assert set(done) == {f"order-{order}" for order in orders}
    assert all(len(runs) == 1 for runs in done.values()), "once each (no redelivery here)"
    # Durable ones ran in the worker's processes, the plain ones in the web process.
    assert all(runs[0].pid != web.pid for runs in done.values())
    assert all(runs[0].pid == web.pid for runs in stack.done("local-").values())
    ids = [runs[0].task_id for runs in done.values()]
    assert len(set(ids)) == len(ids)
    assert stats["handed_off"] == len(orders)
    assert stats["succeeded"] == len(orders)
    assert stats["pending"] == 0
    assert stats["publish_failures"] == 0
    assert_books_balance(stats)
    assert "order-" not in worker_output, "no task argument in the worker's output"


async def test_nothing_is_lost_when_the_broker_is_down_and_the_web_process_is_killed(
    stack: Stack,
) -> None:
    # The broker is down: responses still complete (the tasks are in the outbox), the relay
    # retries with backoff, logs and counts it. Then the web process dies (kill -9) before it
    # ever published: a new process on the same store publishes everything once Redis is up.
    port = free_port()
    stack.broker_url = f"redis://127.0.0.1:{port}/0"
    orders = range(1, 21)
    with stack.web() as first:
        first.wait_ready()
        for order in orders:
            purchase(first, order)
        wait_until(lambda: first.stats()["publish_failures"] >= 2, 20, "publishing retried")
        stats = first.stats()
        assert stats["handed_off"] == 0, stats
        assert stats["pending"] == len(orders), stats
        assert_books_balance(stats)
        assert "wait in the outbox" in first.output
        first.kill()
    outbox = await unfinished(stack.tmp / "store.sqlite3")
    assert len(outbox) == len(orders)
    assert {row.state for row in outbox.values()} == {"outbox"}
    with ExitStack() as up:
        up.enter_context(redis_server(port))
        up.enter_context(stack.worker())
        second = up.enter_context(stack.web())
        second.wait_ready()
        wait_until(lambda: len(stack.done()) == len(orders), 30, "every receipt ran")
        wait_until(lambda: second.stats()["handed_off"] == len(orders), 10, "all handed off")
        stats = second.stats()
        assert stats["recovered"] == len(orders)
        assert_books_balance(stats)
        second.terminate()
    done = stack.done()
    assert {runs[0].task_id for runs in done.values()} == set(outbox)
    assert all(len(runs) == 1 for runs in done.values())
    assert await unfinished(stack.tmp / "store.sqlite3") == {}


async def test_kill_9_of_the_web_process_under_load_loses_no_2xx_side_effect(
    stack: Stack,
) -> None:
    load = Load(path="/purchase")
    with stack.worker(), ExitStack() as servers:
        first = servers.enter_context(stack.web())
        first.wait_ready()
        async with anyio.create_task_group() as clients:
            for _ in range(16):
                clients.start_soon(load.client, first.url)
            await until(lambda: len(stack.done()) >= 50, 30, "50 receipts ran under load")
            first.kill()  # the clients end on their next request: refused
        second = servers.enter_context(stack.web())
        second.wait_ready()
        promised = {f"order-{order}" for order in load.completed}
        await until(
            lambda: promised <= set(stack.done()), 60, "the receipt of every complete 2xx ran"
        )
        second.terminate()
    done = stack.done()
    ids = {entry: {run.task_id for run in runs} for entry, runs in done.items()}
    assert all(len(of_entry) == 1 for of_entry in ids.values()), "one id per order"
    twice = [entry for entry, runs in done.items() if len(runs) > 1]
    print(f"\n{len(promised)} complete 2xx, all ran; {len(twice)} published twice (at-least-once)")


def test_a_worker_killed_mid_task_runs_it_again_with_the_same_id(
    stack: Stack,
) -> None:
    gate = stack.tmp / "gate"
    with stack.web() as web:
        web.wait_ready()
        with stack.worker() as first:
            purchase(web, 1, gate=str(gate))
            wait_until(
                lambda: any(run.event == "started" for run in stack.runs()), 30, "it started"
            )
            first.kill()
        with stack.worker():
            wait_until(
                lambda: sum(run.event == "started" for run in stack.runs()) >= 2,
                60,
                f"it was delivered again: {stack.runs()}",
            )
            gate.touch()
            wait_until(lambda: "order-1" in stack.done(), 30, "it ran to the end")
        web.terminate()
    runs = [run for run in stack.runs() if run.entry == "order-1"]
    assert len({run.task_id for run in runs}) == 1, f"one id on every delivery: {runs}"
    assert runs[0].pid != runs[-1].pid


def test_one_trace_from_the_request_to_the_side_effect_in_the_worker(
    stack: Stack,
) -> None:
    web_spans, worker_spans = stack.tmp / "web-spans.jsonl", stack.tmp / "worker-spans.jsonl"

    def worker_span() -> dict[str, Any] | None:
        found = [
            span
            for span in span_files.read(worker_spans)
            if span["name"] == "after_response record_effect"
        ]
        return found[0] if found else None

    with (
        stack.worker(**{span_files.SPANS_ENV: str(worker_spans)}),
        stack.web(**{span_files.SPANS_ENV: str(web_spans)}) as web,
    ):
        web.wait_ready()
        purchase(web, 1)
        wait_until(lambda: "order-1" in stack.done(), 30, "it ran")
        wait_until(worker_span, 10, "the worker exported its span")
        web.terminate()
    spans = {span["span_id"]: span for span in span_files.read(web_spans)}
    spans.update({span["span_id"]: span for span in span_files.read(worker_spans)})
    ran = worker_span()
    assert ran is not None
    producer = [
        span for span in spans.values() if span["name"] == "after_response publish record_effect"
    ]
    assert len(producer) == 1
    assert producer[0]["kind"] == "PRODUCER"
    server = [
        span
        for span in spans.values()
        if span["kind"] == "SERVER" and span["name"].startswith("POST /purchase")
    ]
    assert len(server) == 1
    trace_id = server[0]["trace_id"]
    assert producer[0]["trace_id"] == trace_id
    assert ran["trace_id"] == trace_id
    # The worker's span descends from the publish span, which descends from the request's.
    chain = []
    span: dict[str, Any] | None = ran
    while span is not None:
        chain.append(span["span_id"])
        span = spans.get(span["parent_id"]) if span["parent_id"] else None
    assert producer[0]["span_id"] in chain
    assert server[0]["span_id"] in chain
    assert (
        ran["attributes"]["after_response.task.id"]
        == producer[0]["attributes"]["after_response.task.id"]
    )
