"""Side effects the worker-runner tests run by import name (``tests.worker_effects:...``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import after_response

#: What the side effects saw: (name, task id, attempt, recovered).
SEEN: list[tuple[str, str, int, bool]] = []


def _note(name: str) -> None:
    task = after_response.current_task()
    SEEN.append((name, task.id, task.attempt, task.recovered))


async def greet(to: str, *, greeting: str = "hello") -> None:
    _note(f"greet {greeting} {to}")


def flaky(failures: int) -> None:
    _note("flaky")
    if after_response.current_task().attempt <= failures:
        raise RuntimeError("flaky failed on purpose")


def sleepy(seconds: float) -> None:
    _note("sleepy")
    time.sleep(seconds)


def broken(secret: str) -> None:
    raise ValueError(f"cannot use {secret}")


#: What ``probe`` calls while it runs (a test's look at the worker from inside a side effect).
PROBES: list[Callable[[], None]] = []


async def probe() -> None:
    for look in PROBES:
        look()
