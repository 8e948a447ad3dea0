"""The side effects of the crash tests, and the ledger they keep of their own runs.

Each run appends one JSON line (its order, the task id from ``current_task()``, whether it
was recovered, its pid and the time) with a single ``write`` on an ``O_APPEND`` descriptor,
then ``fsync``: once a side effect has returned, a ``kill -9`` cannot take its line back,
and processes sharing the file never interleave their lines.

The module imports nothing of the app, so the command line can import these functions too.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Final

from after_response import current_task

#: Seconds a run of :func:`ship` takes, like a call to a downstream service (read per run,
#: so a restarted process can be given a different value than the one that died).
SECONDS_VARIABLE: Final = "AR_TEST_TASK_SECONDS"
#: :func:`charge` succeeds only in a process that has this variable set to ``"1"``.
DOWNSTREAM_UP_VARIABLE: Final = "AR_TEST_DOWNSTREAM_UP"


def append(ledger: str, entry: dict[str, Any]) -> None:
    """Append ``entry`` as one line, durably (written and fsynced when this returns)."""
    line = (json.dumps(entry) + "\n").encode()
    descriptor = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read(ledger: Path) -> list[dict[str, Any]]:
    """Every run written so far, in the order they were written."""
    if not ledger.exists():
        return []
    return [json.loads(line) for line in ledger.read_text().splitlines()]


def _run(order: int, **fields: Any) -> dict[str, Any]:
    task = current_task()
    return {
        "order": order,
        "id": task.id,
        "attempt": task.attempt,
        "recovered": task.recovered,
        "pid": os.getpid(),
        "at": time.time(),
        **fields,
    }


async def ship(ledger: str, order: int, *, to: str) -> None:
    """The checkout's side effect: a downstream call of ``$AR_TEST_TASK_SECONDS`` (0.05),
    then its line in the ledger. ``to`` (an address) must never reach a log line."""
    await asyncio.sleep(float(os.environ.get(SECONDS_VARIABLE, "0.05")))
    append(ledger, _run(order))


async def charge(ledger: str, order: int, *, card_holder: str) -> None:
    """A payment that fails (``ConnectionError`` naming the card holder) unless
    ``$AR_TEST_DOWNSTREAM_UP`` is ``"1"``; each attempt writes its line either way."""
    succeeded = os.environ.get(DOWNSTREAM_UP_VARIABLE) == "1"
    append(ledger, _run(order, succeeded=succeeded))
    if not succeeded:
        raise ConnectionError(f"the payment gateway refused the charge for {card_holder}")


async def crash(ledger: str, order: int) -> None:
    """A side effect that kills its own process at once (a segfault in a C extension): its
    line in the ledger, then SIGKILL to its process. The line is written without an fsync
    (the kernel keeps it through a kill -9): an fsync would give the store's writer thread
    milliseconds to commit whatever it was given meanwhile, which a segfault does not."""
    line = (json.dumps(_run(order)) + "\n").encode()
    descriptor = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(descriptor, line)
    os.kill(os.getpid(), signal.SIGKILL)
