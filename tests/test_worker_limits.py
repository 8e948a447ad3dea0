"""Per side-effect limits in an engine worker: ``max_concurrency`` and ``rate_limit`` bound a
name within one worker process, as in a web process; every attempt passes them, a retry too;
a run cancelled while it waits holds nothing.

First with ``WorkerRunner`` driven directly, as an engine's runner task calls it; then end to
end: a web app under uvicorn hands side effects off, through a real Redis, to a real taskiq
or Celery worker that runs several tasks at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import TaskGroup
from celery import Celery
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from taskiq_redis import RedisStreamBroker

from after_response import AfterResponseMiddleware, SQLiteStore
from after_response._task import Outcome
from after_response._worker import WorkerRunner
from after_response.celery import CeleryEngine
from after_response.taskiq import TaskiqEngine

from . import worker_effects
from .brokers import Worker, celery_worker, read_effects, taskiq_worker
from .durable_process import until
from .engine_apps.effects import one_at_a_time
from .servers import serve_uvicorn
from .test_engine_worker import body

pytestmark = pytest.mark.anyio

#: ``max_concurrency=1``, as the store keeps a task's limits.
ONE_AT_A_TIME = {"max_concurrency": 1, "rate": None}
#: ``rate_limit="2/200ms"``: at most two starts in any 0.2 s.
TWO_PER_200MS = {"max_concurrency": None, "rate": [2, 0.2]}
POLL_TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def holds() -> Iterator[dict[str, asyncio.Event]]:
    """What ``held`` runs wait for, by key: set one to let its run end."""
    worker_effects.HOLDS.clear()
    yield worker_effects.HOLDS
    worker_effects.HOLDS.clear()


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "ledger"


@pytest.fixture
def runner() -> WorkerRunner:
    return WorkerRunner("test")


def lines(ledger: Path) -> list[tuple[str, str, int]]:
    """The ledger's lines: (``start`` or ``end``, the run's key, its attempt)."""
    if not ledger.exists():
        return []
    return [(event, key, int(attempt)) for event, key, attempt, _ in _fields(ledger)]


def start_times(ledger: Path) -> list[float]:
    """When each run started (``time.monotonic()``, the gate's own clock), in order."""
    return sorted(float(at) for event, _, _, at in _fields(ledger) if event == "start")


def _fields(ledger: Path) -> list[list[str]]:
    return [line.split() for line in ledger.read_text().splitlines()]


def started(ledger: Path) -> list[str]:
    return [key for event, key, _ in lines(ledger) if event == "start"]


def in_turn(*runs: str | tuple[str, int]) -> list[tuple[str, str, int]]:
    """The ledger of runs (a key, or a key and its attempt: 1 by default) that ran one
    after the other, in that order."""
    attempts = [(run, 1) if isinstance(run, str) else run for run in runs]
    return [(event, key, attempt) for key, attempt in attempts for event in ("start", "end")]


def held(ledger: Path, key: str, failures: int = 0, attempts: int = 1) -> Any:
    """A run of ``held(key)``, a name with ``max_concurrency=1``."""
    return body("held", str(ledger), key, failures, attempts=attempts, limits=ONE_AT_A_TIME)


async def until_waiting(runner: WorkerRunner, what: str) -> None:
    """Poll until one run of ``runner`` waits for its name's room."""
    await until(lambda: runner.stats().waiting == 1, POLL_TIMEOUT, what)


async def start_holding(runs: TaskGroup, runner: WorkerRunner, ledger: Path, key: str) -> None:
    """Start a ``held`` run of ``key``; return once it runs, holding its name's one slot."""
    runs.start_soon(runner.run, held(ledger, key))
    await until(lambda: started(ledger) == [key], POLL_TIMEOUT, f"{key} started")


async def test_runs_of_a_name_with_max_concurrency_one_never_overlap(
    ledger: Path, runner: WorkerRunner
) -> None:
    async with anyio.create_task_group() as runs:
        for key in "abcd":
            runs.start_soon(
                runner.run, body("one_at_a_time", str(ledger), key, limits=ONE_AT_A_TIME)
            )
    events = lines(ledger)
    assert len(events) == 8
    # One start, then its own end, four times: never a second start before an end.
    for begin, end in zip(events[0::2], events[1::2], strict=True):
        assert (begin[0], end[0], begin[1]) == ("start", "end", end[1]), events
    assert sorted(key for _, key, _ in events[0::2]) == list("abcd")
    stats = runner.stats()
    assert (stats.received, stats.succeeded, stats.running, stats.waiting) == (4, 4, 0, 0)


async def test_a_name_at_its_limit_holds_back_only_its_own_runs(
    ledger: Path, runner: WorkerRunner, holds: dict[str, asyncio.Event]
) -> None:
    async with anyio.create_task_group() as runs:
        await start_holding(runs, runner, ledger, "first")
        runs.start_soon(runner.run, held(ledger, "second"))
        await until_waiting(runner, "the second run waits")
        # Another name, without limits, runs at once meanwhile.
        assert await runner.run(body("greet", "ada")) is Outcome.SUCCEEDED
        assert [name for name, *_ in worker_effects.SEEN] == ["greet hello ada"]
        stats = runner.stats()
        assert (stats.running, stats.waiting, stats.succeeded) == (1, 1, 1)
        assert started(ledger) == ["first"]
        holds["first"].set()
        holds["second"].set()
    assert lines(ledger) == in_turn("first", "second")
    stats = runner.stats()
    assert (stats.received, stats.succeeded, stats.running, stats.waiting) == (3, 3, 0, 0)


async def test_a_retry_passes_its_name_s_limit_again(
    ledger: Path, runner: WorkerRunner, holds: dict[str, asyncio.Event]
) -> None:
    """As in the executor: a failed attempt gives its name's slot back while it backs off,
    and its retry waits in line behind the runs that came first."""
    async with anyio.create_task_group() as runs:
        runs.start_soon(runner.run, held(ledger, "retried", failures=1, attempts=2))
        await until(lambda: started(ledger) == ["retried"], POLL_TIMEOUT, "its first attempt")
        runs.start_soon(runner.run, held(ledger, "other"))
        await until_waiting(runner, "the other run waits")
        holds["retried"].set()  # its first attempt fails
        await until(
            lambda: started(ledger) == ["retried", "other"] and runner.stats().waiting == 1,
            POLL_TIMEOUT,
            "the other run started and the retry waits",
        )
        holds["other"].set()
    assert lines(ledger) == in_turn("retried", "other", ("retried", 2))
    stats = runner.stats()
    assert (stats.succeeded, stats.retried, stats.waiting) == (2, 1, 0)


async def test_starts_of_a_rate_limited_name_are_spaced_by_its_rate(
    ledger: Path, runner: WorkerRunner
) -> None:
    submitted = time.monotonic()
    async with anyio.create_task_group() as runs:
        for key in range(6):
            runs.start_soon(runner.run, body("stamp", str(ledger), str(key), limits=TWO_PER_200MS))
    starts = start_times(ledger)
    assert len(starts) == 6
    # What the rate guarantees: two starts, then two more 0.2 s later at the earliest, and
    # so on; a lower bound only (a busy machine starts them later, never earlier).
    for index, at in enumerate(starts):
        assert at - submitted >= (index // 2) * 0.2 - 1e-6, (index, starts, submitted)
    assert runner.stats().succeeded == 6


async def test_a_run_cancelled_while_it_waits_frees_nothing_and_the_next_one_proceeds(
    ledger: Path, runner: WorkerRunner, holds: dict[str, asyncio.Event]
) -> None:
    async with anyio.create_task_group() as runs:
        await start_holding(runs, runner, ledger, "first")
        cancelled = asyncio.ensure_future(runner.run(held(ledger, "cancelled")))
        await until_waiting(runner, "the run waits")
        cancelled.cancel()  # as a stopping worker may: run() raises, nothing is acknowledged
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        stats = runner.stats()
        assert (stats.received, stats.running, stats.waiting) == (2, 1, 0)
        # It took nothing: the first run still holds the name's one slot, so the next waits.
        runs.start_soon(runner.run, held(ledger, "next"))
        await until_waiting(runner, "the next run waits")
        holds["first"].set()
        holds["next"].set()
    assert lines(ledger) == in_turn("first", "next")  # the cancelled run never ran
    stats = runner.stats()
    assert (stats.received, stats.succeeded, stats.running, stats.waiting) == (3, 2, 0, 0)


def web_engine(engine: str, redis_url: str) -> Any:
    """The web side's engine, on a client of its own."""
    if engine == "celery":
        return CeleryEngine(Celery("web", broker=redis_url))
    return TaskiqEngine(RedisStreamBroker(redis_url, unacknowledged_lock_timeout=5))


def worker_of(engine: str, redis_url: str, ledger: Path) -> AbstractContextManager[Worker]:
    """A worker process that runs several tasks at once: taskiq's event loop with eight
    async tasks, or Celery's ``threads`` pool with four threads (its prefork pool runs one
    task at a time in each child process, which no limit of a process could hold back)."""
    if engine == "celery":
        app = "tests.engine_apps.celery_engine_app"
        return celery_worker(app, redis_url, ledger=ledger, pool="threads", concurrency=4)
    broker = "tests.engine_apps.taskiq_engine_app:broker"
    return taskiq_worker(broker, redis_url, ledger=ledger, max_async_tasks=8)


@pytest.mark.parametrize("engine", ["taskiq", "celery"])
async def test_a_worker_runs_the_handed_off_runs_of_a_name_one_at_a_time(
    engine: str, redis_url: str, ledger: Path, tmp_path: Path
) -> None:
    """A request hands off six durable runs of ``@side_effect(max_concurrency=1)``; the
    worker could run several at once, and runs these one after the other."""
    orders = [f"order-{number}" for number in range(6)]

    async def purchase(request: Request) -> PlainTextResponse:
        for order in orders:
            request.state.after_response.options(durable=True).add(one_at_a_time, order)
        return PlainTextResponse("ok")

    app = AfterResponseMiddleware(
        Starlette(routes=[Route("/purchase", purchase, methods=["POST"])]),
        store=SQLiteStore(tmp_path / "store.sqlite3"),
        engine=web_engine(engine, redis_url),
    )

    def done() -> int:
        return sum(line.event == "done" for line in read_effects(ledger))

    with worker_of(engine, redis_url, ledger) as worker:
        async with serve_uvicorn(app) as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.post("/purchase")).status_code == 200
            await until(lambda: done() == len(orders), 30, "all ran")
            assert app.stats().handed_off == len(orders)
        output = worker.output()
    runs = read_effects(ledger)
    assert len(runs) == 2 * len(orders)
    for begin, end in zip(runs[0::2], runs[1::2], strict=True):
        assert (begin.event, end.event, begin.entry) == ("started", "done", end.entry), runs
    assert sorted(run.entry for run in runs[0::2]) == orders
    assert len({run.pid for run in runs}) == 1  # one worker process
    assert "order-" not in output, "no task argument in the worker's output"
