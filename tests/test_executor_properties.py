"""Whatever the mix of tasks, each ends in exactly one terminal state and the counts add up."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send

from after_response import (
    AfterResponseMiddleware,
    Retry,
    TaskAbandonedError,
    TaskShedError,
    TaskTimeoutError,
    current,
)

from .asgi import call, http_scope, lifespan

KINDS = ["ok", "fail", "sync_ok", "sync_fail", "flaky", "always_flaky", "timeout", "hang"]


async def scenario(
    requests: list[list[tuple[str, bool]]],
    max_concurrency: int,
    max_pending: int,
    failing_request: int | None,
) -> None:
    succeeded: list[str] = []
    dead: list[tuple[str, type[BaseException]]] = []
    flaky_calls: Counter[str] = Counter()

    violations: list[Any] = []

    def check_bounds() -> None:
        stats = middleware.stats()
        if stats.running > max_concurrency or stats.pending > max_pending:
            violations.append(stats)

    def make(kind: str, name: str) -> Any:
        async def ok() -> None:
            check_bounds()
            succeeded.append(name)

        async def fail() -> None:
            check_bounds()
            raise ValueError(name)

        def sync_ok() -> None:
            succeeded.append(name)

        def sync_fail() -> None:
            raise ValueError(name)

        async def flaky() -> None:
            flaky_calls[name] += 1
            if flaky_calls[name] < 2:
                raise ConnectionError(name)
            succeeded.append(name)

        async def always_flaky() -> None:
            raise ConnectionError(name)

        async def hang() -> None:
            check_bounds()
            await anyio.sleep_forever()

        return {
            "ok": ok,
            "fail": fail,
            "sync_ok": sync_ok,
            "sync_fail": sync_fail,
            "flaky": flaky,
            "always_flaky": always_flaky,
            "timeout": hang,
            "hang": hang,
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
        on_dead_letter=lambda letter: dead.append((letter.task_name, type(letter.exception))),
    )
    with anyio.fail_after(10):
        async with lifespan(middleware), anyio.create_task_group() as tg:
            for index in range(len(plan)):
                tg.start_soon(call, middleware, http_scope(f"/{index}"))

    assert violations == []
    stats = middleware.stats()
    all_names = {name for entries in plan for _, name, _ in entries}
    dead_names = [name for name, _ in dead]
    # Exactly one terminal state per task.
    ended = succeeded + dead_names + sorted(expected_discarded)
    assert sorted(ended) == sorted(all_names)
    # The counts add up and nothing is left in flight.
    assert (stats.collected, stats.pending, stats.running) == (0, 0, 0)
    assert stats.added == len(all_names) == stats.finished
    by_type = Counter(kind for _, kind in dead)
    assert stats.succeeded == len(succeeded)
    assert stats.discarded == len(expected_discarded)
    assert stats.timed_out == by_type[TaskTimeoutError]
    assert stats.shed == by_type[TaskShedError]
    assert stats.abandoned == by_type[TaskAbandonedError]
    assert stats.failed == by_type[ValueError] + by_type[ConnectionError]
    # Tasks that cannot succeed never do; tasks that can only fail in known ways.
    for name in succeeded:
        assert name.rsplit("-", 1)[1] in ("ok", "sync_ok", "flaky")
    for name, kind in dead:
        task_kind = name.rsplit("-", 1)[1]
        if kind in (ValueError,):
            assert task_kind in ("fail", "sync_fail")
        if kind is ConnectionError:
            assert task_kind == "always_flaky"
        if kind is TaskTimeoutError:
            assert task_kind == "timeout"


task = st.tuples(st.sampled_from(KINDS), st.booleans())


@settings(max_examples=150, deadline=None)
@given(
    requests=st.lists(st.lists(task, max_size=6), min_size=1, max_size=6),
    max_concurrency=st.integers(1, 4),
    max_pending=st.integers(0, 6),
    failing_request=st.one_of(st.none(), st.integers(0, 5)),
    backend=st.sampled_from(["asyncio", "trio"]),
)
def test_every_task_ends_in_exactly_one_terminal_state(
    requests: list[list[tuple[str, bool]]],
    max_concurrency: int,
    max_pending: int,
    failing_request: int | None,
    backend: str,
) -> None:
    anyio.run(scenario, requests, max_concurrency, max_pending, failing_request, backend=backend)
