"""Side effects that the engine tests hand off: importable by name in the web process and in
the workers, each writing its own ledger line (``EVENT ENTRY TASK_ID PID ATTEMPT``).

The ledger file is ``$AFTER_RESPONSE_TEST_LEDGER``; a gate file, when given, holds a run
until the test creates it (so a test can kill a worker while the side effect is known to run).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import after_response
from tests.engine_apps import LEDGER_ENV, required_environment, wait_for_gate


def _append(event: str, entry: str) -> None:
    task = after_response.current_task()
    line = f"{event} {entry} {task.id} {os.getpid()} {task.attempt}\n"
    with Path(required_environment(LEDGER_ENV)).open("a", encoding="utf-8") as file:
        file.write(line)


def record_effect(entry: str, gate: str | None = None) -> None:
    """A plain side effect: ``started``, wait for ``gate`` if given, ``done``."""
    _append("started", entry)
    if gate is not None:
        wait_for_gate(gate)
    _append("done", entry)


async def arecord_effect(entry: str) -> None:
    """An async side effect: one ``done`` line."""
    _append("done", entry)


def flaky_effect(entry: str, failures: int) -> None:
    """Fails its first ``failures`` attempts (a ``failed`` line each), then succeeds."""
    if after_response.current_task().attempt <= failures:
        _append("failed", entry)
        raise RuntimeError("flaky_effect failed on purpose")
    _append("done", entry)


def slow_effect(entry: str, seconds: float) -> None:
    """Sleeps ``seconds`` (to time out), then ``done``."""
    _append("started", entry)
    time.sleep(seconds)
    _append("done", entry)


@after_response.side_effect(max_concurrency=1)
async def one_at_a_time(entry: str) -> None:
    """At most one run at once in a process: ``started``, a moment, ``done``; runs that
    overlap show as two ``started`` lines in a row."""
    _append("started", entry)
    await asyncio.sleep(0.1)  # long enough for another run to start, if one may
    _append("done", entry)
