"""Whatever the mix of tasks, each ends in exactly one terminal state, the counts add up, and
shutdown always completes: succeeding, failing, BaseException-raising, slow, retrying and
cancellation-ignoring side effects, through lifespan startup, concurrent requests and
shutdown."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send

from after_response import (
    AfterResponseMiddleware,
    DeadLetter,
    Retry,
    Stats,
    TaskAbandonedError,
    TaskShedError,
    TaskTimeoutError,
    _executor,
    current,
    current_task,
)

from .asgi import call, http_scope, lifespan

KINDS = [
    "ok",
    "fail",
    "sync_ok",
    "sync_fail",
    "flaky",
    "always_flaky",
    "timeout",
    "hang",
    "slow",
    "base",
    "sync_exit",
    "ignore_cancel",
]
#: Kinds that may succeed, and the exception types each of the others may be dead-lettered with
#: (besides shed and abandoned, which any task may be).
SUCCEEDING = {"ok", "sync_ok", "flaky", "slow"}
FAILURES: dict[str, tuple[type[BaseException], ...]] = {
    "fail": (ValueError,),
    "sync_fail": (ValueError,),
    "always_flaky": (ConnectionError,),
    "timeout": (TaskTimeoutError,),
    "base": (KeyboardInterrupt, SystemExit, GeneratorExit),
    "sync_exit": (SystemExit,),
}
#: The grace a cancelled task gets at shutdown, shortened so that examples with a task that
#: ignores its cancellation stay fast (the subprocess tests use the real one).
SHORT_GRACE = 0.05
#: How long the event loop may take to close once the scenario returned.
LOOP_EXIT_BOUND = 10.0


async def scenario(
    requests: list[list[tuple[str, bool]]],
    max_concurrency: int,
    max_pending: int,
    failing_request: int | None,
) -> Stats:
    succeeded: list[tuple[str, str]] = []
    dead: list[DeadLetter] = []
    flaky_calls: Counter[str] = Counter()

    violations: list[Any] = []

    def check_bounds() -> None:
        stats = middleware.stats()
        if stats.running > max_concurrency or stats.pending > max_pending:
            violations.append(stats)
        if stats.added != stats.collected + stats.pending + stats.running + stats.finished:
            violations.append(stats)

    def success(name: str) -> None:
        succeeded.append((name, current_task().id))

    def make(kind: str, name: str) -> Any:
        async def ok() -> None:
            check_bounds()
            success(name)

        async def fail() -> None:
            check_bounds()
            raise ValueError(name)

        def sync_ok() -> None:
            success(name)

        def sync_fail() -> None:
            raise ValueError(name)

        async def flaky() -> None:
            flaky_calls[name] += 1
            if flaky_calls[name] < 2:
                raise ConnectionError(name)
            success(name)

        async def always_flaky() -> None:
            raise ConnectionError(name)

        async def hang() -> None:
            check_bounds()
            await anyio.sleep_forever()

        async def slow() -> None:
            await anyio.sleep(0.02)
            success(name)

        async def base() -> None:
            check_bounds()
            raise (KeyboardInterrupt, SystemExit, GeneratorExit)[len(name) % 3](name)

        def sync_exit() -> None:
            sys.exit(name)

        async def ignore_cancel() -> None:  # asyncio only: trio cancels at every await
            check_bounds()
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    continue

        return {
            "ok": ok,
            "fail": fail,
            "sync_ok": sync_ok,
            "sync_fail": sync_fail,
            "flaky": flaky,
            "always_flaky": always_flaky,
            "timeout": hang,
            "hang": hang,
            "slow": slow,
            "base": base,
            "sync_exit": sync_exit,
            "ignore_cancel": ignore_cancel,
        }[kind]

    expected_discarded: set[str] = set()
    plan: list[list[tuple[str, str, bool]]] = []
    for index, tasks in enumerate(requests):
        entries = []
        for number, (kind, run_on_error) in enumerate(tasks):
            name = f"r{index}t{number}-{kind}"
            entries.append((kind, name, run_on_error))
            if index == failing_request and not run_on_error:
                expected_discarded.add(name)
        plan.append(entries)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        index = int(scope["path"].strip("/"))
        for kind, name, run_on_error in plan[index]:
            current().options(
                name=name,
                timeout=0.01 if kind == "timeout" else None,
                retry=Retry(attempts=2, backoff=0) if "flaky" in kind else None,
                run_on_error=run_on_error,
            ).add(make(kind, name))
        status = 500 if index == failing_request else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def app_with_lifespan(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("bare app: no lifespan")
        await app(scope, receive, send)

    middleware = AfterResponseMiddleware(
        app_with_lifespan,
        max_concurrency=max_concurrency,
        max_pending=max_pending,
        overflow_timeout=0.01,
        shutdown_timeout=0.05,
        on_dead_letter=dead.append,
    )
    # Shutdown always completes: the drain, the grace, and abandoning what is left.
    with anyio.fail_after(10):
        async with lifespan(middleware), anyio.create_task_group() as tg:
            for index in range(len(plan)):
                tg.start_soon(call, middleware, http_scope(f"/{index}"))
        assert await middleware.drain(timeout=5)  # the hook has seen every dead letter

    assert violations == []
    stats = middleware.stats()
    all_names = {name for entries in plan for _, name, _ in entries}
    # Exactly one terminal state per task: each runs to success, is dead-lettered or is
    # discarded, once, under one id.
    ended = [name for name, _ in succeeded]
    ended += [letter.task_name for letter in dead]
    ended += sorted(expected_discarded)
    assert sorted(ended) == sorted(all_names)
    ids = [task_id for _, task_id in succeeded] + [letter.task_id for letter in dead]
    assert len(set(ids)) == len(ids)
    # The counts add up and nothing is left in flight.
    assert (stats.collected, stats.pending, stats.running) == (0, 0, 0)
    assert stats.added == len(all_names) == stats.finished
    by_type = Counter(type(letter.exception) for letter in dead)
    assert stats.succeeded == len(succeeded)
    assert stats.discarded == len(expected_discarded)
    assert stats.timed_out == by_type[TaskTimeoutError]
    assert stats.shed == by_type[TaskShedError]
    assert stats.abandoned == by_type[TaskAbandonedError]
    assert stats.failed == len(dead) - stats.timed_out - stats.shed - stats.abandoned
    # Tasks that cannot succeed never do; the others fail only in their own ways.
    for name, _ in succeeded:
        assert name.rsplit("-", 1)[1] in SUCCEEDING
    for letter in dead:
        kind = letter.task_name.rsplit("-", 1)[1]
        if letter.outcome in ("failed", "timed_out"):
            assert isinstance(letter.exception, FAILURES[kind]), (kind, letter)
        else:
            assert letter.outcome in ("shed", "abandoned"), letter
    return stats


@contextmanager
def short_grace() -> Iterator[None]:
    grace = _executor.CANCEL_GRACE
    _executor.CANCEL_GRACE = SHORT_GRACE  # type: ignore[misc]
    try:
        yield
    finally:
        _executor.CANCEL_GRACE = grace  # type: ignore[misc]


def run_to_exit(backend: str, *args: Any) -> Stats:
    """Run the scenario in an event loop of its own and check that the loop closes: a task
    left behind must not keep ``asyncio.run()`` (hypercorn's runner too) from returning."""
    errors: list[BaseException] = []
    results: list[Stats] = []

    def run() -> None:
        try:
            results.append(anyio.run(scenario, *args, backend=backend))
        except BaseException as error:  # handed to the test's thread
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(LOOP_EXIT_BOUND + 10)
    assert not thread.is_alive(), "the event loop did not close after the scenario"
    if errors:
        raise errors[0]
    return results[0]


task = st.tuples(st.sampled_from(KINDS), st.booleans())


@settings(max_examples=150, deadline=None)
@given(
    requests=st.lists(st.lists(task, max_size=6), min_size=1, max_size=6),
    max_concurrency=st.integers(1, 4),
    max_pending=st.integers(0, 6),
    failing_request=st.one_of(st.none(), st.integers(0, 5)),
    backend=st.sampled_from(["asyncio", "trio"]),
)
def test_every_task_ends_in_exactly_one_terminal_state_and_shutdown_completes(
    requests: list[list[tuple[str, bool]]],
    max_concurrency: int,
    max_pending: int,
    failing_request: int | None,
    backend: str,
) -> None:
    # Under trio a cancelled scope cancels every later await too: a task cannot ignore it.
    assume(backend == "asyncio" or all(kind != "ignore_cancel" for r in requests for kind, _ in r))
    with short_grace():
        stats = run_to_exit(backend, requests, max_concurrency, max_pending, failing_request)
    event(f"failed: {stats.failed > 0}")
    event(f"abandoned: {stats.abandoned > 0}")
