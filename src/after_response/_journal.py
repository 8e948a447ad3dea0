"""The executor's link to a durable store: it saves durable tasks before their response
completes, writes down how each attempt ends, releases what shutdown leaves unfinished, and
claims the tasks of processes that died (or that were released or spilled) to run them here.

Delivery is at-least-once: a task whose process died mid-run runs again, with the same id,
and the same attempt number; but not for ever: after its process died
:data:`~after_response._store.MAX_INTERRUPTED` times while it ran, it is a dead letter.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Final

from ._aggregate import LogAggregator
from ._callable import CallableInfo
from ._durable import context_from_carrier, from_stored, not_importable, to_stored
from ._errors import TaskProcessDiedError
from ._logs import qualified_type
from ._record import TaskRecord
from ._redact import exception_text
from ._store import (
    MAX_INTERRUPTED,
    QUEUED,
    RUNNABLE,
    SUSPECT_INTERRUPTED,
    StoredTask,
    StoreError,
)
from ._task import Task

#: Tasks claimed at most in one go.
CLAIM_BATCH: Final = 256
#: The error type of the dead letter of a task whose process died while it ran, too often.
PROCESS_DIED: Final = "ProcessDied"


def new_owner_id() -> str:
    """This process's name in the store: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


class Journal:
    """Durable bookkeeping for one executor, over one store."""

    def __init__(self, store: object, lines: LogAggregator) -> None:
        self.store = store  # an SQLiteStore, or anything with its methods
        #: Where lines about stored tasks that cannot run are aggregated (per name).
        self.lines = lines
        self.owner = new_owner_id()
        self.opened = False
        #: The state durable tasks are saved in: ``outbox`` when an engine runs them.
        self.durable_state = QUEUED
        #: The last suspect claimed (see SUSPECT_INTERRUPTED): no other is claimed until
        #: it has ended.
        self.suspect: Task | None = None

    async def open(self) -> None:
        await self.store.open(self.owner)  # type: ignore[attr-defined]
        self.opened = True

    async def close(self) -> None:
        if self.opened:
            self.opened = False
            await self.store.close()  # type: ignore[attr-defined]

    async def save(self, records: Sequence[TaskRecord], *, owned: bool = True) -> set[str]:
        """Store ``records`` (committed when this returns); the ids deduplicated by key.
        ``owned=False`` stores them for any process to claim (spilled).

        Raises:
            StoreError: nothing was stored.
        """
        if not self.opened:
            # No lifespan (or a request before its startup): the first save opens the store.
            await self.open()
        owner, state = (self.owner, self.durable_state) if owned else (None, QUEUED)
        rows = [to_stored(record, owner, state) for record in records]
        deduplicated = set(await self.store.save(rows))  # type: ignore[attr-defined]
        return deduplicated

    async def running(self, task: Task) -> None:
        """Record that an attempt of ``task`` starts, committed before it does: if its
        process dies while it runs (a side effect that kills it at once included), the next
        claim counts it as interrupted. A store that fails is logged; the attempt runs."""
        if self._write("mark_running", task.record.id, task.attempt):
            try:
                await self.store.flush()  # type: ignore[attr-defined]
            except (StoreError, RuntimeError) as exc:
                self._failed("mark_running", exc)

    def succeeded(self, task: Task) -> None:
        self._write("mark_succeeded", task.record.id)

    def retrying(self, task: Task, delay: float, exc: BaseException) -> None:
        kind, message = _error(task, exc)
        self._write(
            "mark_retry", task.record.id, task.attempt - 1, time.time() + delay, kind, message
        )

    def dead(self, task: Task, exc: BaseException) -> None:
        kind, message = _error(task, exc)
        self._write("mark_dead", task.record.id, task.attempt, kind, message)

    def release(self, tasks: Sequence[Task]) -> None:
        if tasks:
            self._write("release", [task.record.id for task in tasks])

    def published(self, tasks: Sequence[Task]) -> None:
        self._write("mark_published", [task.record.id for task in tasks])

    async def claim(
        self, limit: int, next_seq: object, *, states: Sequence[str] = RUNNABLE
    ) -> tuple[list[Task], list[tuple[Task, Exception]]]:
        """Take up to ``limit`` tasks in ``states`` that no live process owns: the live tasks
        to run (or publish) here, and those that must not run, with why.

        A task whose function cannot be imported any more must not run, nor one whose
        process died ``MAX_INTERRUPTED`` times while it ran: each is logged and marked dead
        in the store here, for the caller to end (count, span, dead-letter hook). Of the
        suspects (interrupted ``SUSPECT_INTERRUPTED`` times), one is taken at a time.
        """
        suspect = self.suspect
        rows: list[StoredTask] = await self.store.claim(  # type: ignore[attr-defined]
            self.owner,
            min(limit, CLAIM_BATCH),
            states=states,
            max_suspects=0 if suspect is not None and not suspect.done else 1,
        )
        tasks: list[Task] = []
        dead: list[tuple[Task, Exception]] = []
        for row in rows:
            record, fn = from_stored(row)
            context = context_from_carrier(record.trace_context or {})
            seq = next_seq()  # type: ignore[operator]  # counted as added: its end is counted
            exc: Exception | None = None
            if row.interrupted >= MAX_INTERRUPTED:
                # Run again, it would kill this process too, and then the next one.
                died = f"its process died {row.interrupted} times while it ran"
                why = f"{died} (a side effect that crashes its process?)"
                self._dead_at_claim(row, died, why, PROCESS_DIED, f"{why}; not run again")
                exc = TaskProcessDiedError(f"{row.name} was not run again: {why}")
            elif fn is None:  # a function removed in a deploy
                why = f"{row.target} cannot be imported any more"
                reason = f"cannot be imported any more ({row.target})"
                self._dead_at_claim(row, reason, why, "ImportError", row.target)
                exc = ImportError(why)
            if exc is not None:
                task = Task(record, fn or not_importable, False, context, seq)
                task.attempt = row.attempt + row.interrupted  # the attempts that started
                dead.append((task, exc))
                continue
            assert fn is not None
            task = Task(record, fn, CallableInfo(fn).is_async, context, seq)
            task.attempt = row.attempt + 1
            task.recovered = row.recovered
            if row.interrupted >= SUSPECT_INTERRUPTED:
                self.suspect = task
            tasks.append(task)
        return tasks, dead

    def _dead_at_claim(
        self, row: StoredTask, reason: str, why: str, error_type: str, message: str
    ) -> None:
        """A claimed task that must not run: a dead letter at once. Such tasks come back in
        batches (all those of a removed function), so their lines are aggregated per task
        name and ``reason``."""
        self.lines.emit(
            logging.ERROR,
            (row.name, reason),
            "after-response stored task %s (%s) cannot run: %s; it is a dead letter now",
            (row.name, row.id, why),
            {"task_name": row.name, "task_id": row.id},
        )
        self._write("mark_dead", row.id, row.attempt, error_type, message)

    def _write(self, method: str, *args: object) -> bool:
        try:
            getattr(self.store, method)(*args)
        except (StoreError, RuntimeError) as exc:  # the store closed or broke: say so
            self._failed(method, exc)
            return False
        return True

    def _failed(self, method: str, exc: BaseException) -> None:
        # Once per interval: a broken store fails every task's marks alike.
        what = f"{method} failed ({type(exc).__qualname__})"
        self.lines.emit(
            logging.ERROR,
            ("the durable store", what),
            "after-response durable store: %s; the task may run again after a restart "
            "(delivery is at-least-once)",
            (what,),
            counted="failures of",
        )


def _error(task: Task, exc: BaseException) -> tuple[str, str]:
    message, _ = exception_text(exc, task.fn, task.record.args, task.record.kwargs)
    return qualified_type(exc), message
