"""Side effects the worker-runner tests run by import name (``tests.worker_effects:...``)."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
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


def _ledger_line(ledger: str, event: str, key: str) -> None:
    """Append ``EVENT KEY ATTEMPT MONOTONIC_TIME`` to the file ``ledger``."""
    attempt = after_response.current_task().attempt
    with open(ledger, "a") as file:
        file.write(f"{event} {key} {attempt} {time.monotonic()!r}\n")


async def one_at_a_time(ledger: str, key: str) -> None:
    """Writes its start and its end: runs that overlap show as two starts in a row."""
    _ledger_line(ledger, "start", key)
    await asyncio.sleep(0.02)  # long enough for another run to start, if one may
    _ledger_line(ledger, "end", key)


async def stamp(ledger: str, key: str) -> None:
    """Writes its start, with the time."""
    _ledger_line(ledger, "start", key)


#: What ``held`` runs wait for, by key (made on first use); the limit tests set them.
HOLDS: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)


async def held(ledger: str, key: str, failures: int = 0) -> None:
    """Writes its start, waits for ``HOLDS[key]``, writes its end; then fails if it is one of
    its first ``failures`` attempts."""
    _ledger_line(ledger, "start", key)
    await HOLDS[key].wait()
    _ledger_line(ledger, "end", key)
    if after_response.current_task().attempt <= failures:
        raise RuntimeError("held failed on purpose")
