"""Importable side effects for the replay tests: each appends what it was called with to a
ledger file (one JSON line per call), so a test can see in which process it ran and how."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from typing import Any

from after_response import current_task


def _append(ledger: str, entry: dict[str, Any]) -> None:
    with open(ledger, "a") as file:
        file.write(json.dumps({**entry, "pid": os.getpid()}) + "\n")


async def record(ledger: str, to: str, *, code: str) -> None:
    _append(ledger, {"task": "record", "to": to, "code": code})


def record_sync(ledger: str, order: int) -> None:
    _append(ledger, {"task": "record_sync", "order": order})


class Receipts:
    @staticmethod
    async def send(ledger: str, order: dict[str, Any]) -> None:
        _append(ledger, {"task": "Receipts.send", "order": order})


async def always_fails(ledger: str, address: str) -> None:
    _append(ledger, {"task": "always_fails"})
    raise ConnectionError(f"could not reach {address}")


async def hangs(ledger: str) -> None:
    _append(ledger, {"task": "hangs"})
    await asyncio.sleep(3600)


#: Gates the in-process tests open: ``gated`` waits for ``GATES[name]`` to be set.
GATES: dict[str, asyncio.Event] = {}
#: How many ``gated`` runs have started, by gate: a durable attempt starts once its start
#: mark is committed, so a test that counts these knows the marks are written.
ENTERED: dict[str, int] = {}


async def gated(ledger: str, name: str) -> None:
    ENTERED[name] = ENTERED.get(name, 0) + 1
    await GATES[name].wait()
    _append(ledger, {"task": "gated", "gate": name})


async def one_at_a_time(ledger: str, n: int) -> None:
    """Writes its start and its end: runs that overlap show as two starts in a row."""
    _append(ledger, {"task": "one_at_a_time", "n": n, "at": "start"})
    await asyncio.sleep(0.02)  # long enough for another run to start, if one may
    _append(ledger, {"task": "one_at_a_time", "n": n, "at": "end"})


async def wrong_error(ledger: str) -> None:
    _append(ledger, {"task": "wrong_error"})
    raise ValueError("not worth another attempt")


async def quotes_its_arguments(
    ledger: str, token: str, recipients: dict[str, Any], items: list[str], *, note: str
) -> None:
    """Fails with its arguments in its message as exceptions quote them: as text, repr()s,
    dict keys, a list's repr."""
    _append(ledger, {"task": "quotes_its_arguments"})
    raise ValueError(
        f"bad token {token} ({token!r}); bad mapping {list(recipients)}; bad items {items}; "
        f"bad note {note!r}"
    )


async def read_own_row(ledger: str, db: str) -> None:
    """Writes its own row's state and attempt as the store has them committed when it runs."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        query = "SELECT state, attempt FROM tasks WHERE id = ?"
        state, attempt = conn.execute(query, (current_task().id,)).fetchone()
    _append(ledger, {"task": "read_own_row", "state": state, "attempt": attempt})
