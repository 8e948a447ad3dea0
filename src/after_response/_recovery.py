"""The executor's durable side: storing durable tasks before their response completes, and
claiming the stored tasks that no live process owns (a dead process's, released, spilled)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

import anyio

from ._dispatch import Dispatcher
from ._durable import storable, trace_carrier
from ._endings import Endings
from ._journal import CLAIM_BATCH
from ._logs import log_task, log_task_aggregated, qualified_type
from ._store import RUNNABLE, StoreError
from ._task import Outcome, Task

if TYPE_CHECKING:
    from ._tasks import Spawner

#: Seconds between two looks at the durable store for tasks nobody live owns.
RECOVERY_INTERVAL: Final = 1.0


class Durable(Endings):
    """What the executor does with a durable store (mixed into ``Executor``)."""

    max_concurrency: int
    max_pending: int
    #: overflow="spill": tasks that find no room are written to the store, not shed.
    spill: bool
    #: Whether the store may hold tasks to claim as soon as there is room, and the event
    #: that wakes the claiming loop when a slot frees.
    backlog = False
    room_freed: anyio.Event | None = None
    background: Spawner | None
    _waiting: int

    if TYPE_CHECKING:

        def submit(self, tasks: list[Task], owner: Spawner | None = None) -> list[Task]: ...

    async def save(self, tasks: list[Task]) -> set[Task]:
        """Store durable ``tasks`` before their response completes; those deduplicated by
        key are ended (logged, counted) and returned.

        Raises:
            StoreError: nothing was stored.
        """
        assert self.journal is not None
        deduplicated_ids = await self.journal.save([task.record for task in tasks])
        self.ledger.stored += len(tasks) - len(deduplicated_ids)
        deduplicated = {task for task in tasks if task.record.id in deduplicated_ids}
        for task in tasks:
            if task not in deduplicated:
                self.telemetry.stored(task)
        for task in deduplicated:
            self.ledger.left_request += 1
            log_task(
                logging.INFO,
                task,
                "deduplicated: a stored task has its key (it runs once)",
            )
            self.end(task, Outcome.DEDUPLICATED, attempts=0)
        return deduplicated

    def shed(self, tasks: Iterable[Task], reason: str) -> None:
        """With ``overflow="spill"``, tasks that find no room go to the store (those that can
        be stored: importable by name, JSON arguments), to run when there is room."""
        tasks = list(tasks)
        owner = self.background
        if self.spill and self.journal is not None and owner is not None:
            spilled = [
                task for task in tasks if not task.record.durable and storable(task.fn, task.record)
            ]
            if spilled:
                self.backlog = True
                owner.start_soon(self._spill, spilled, reason)
                tasks = [task for task in tasks if task not in spilled]
        super().shed(tasks, reason)

    async def _spill(self, tasks: list[Task], reason: str) -> None:
        assert self.journal is not None
        records = [task.record.replace(trace_context=trace_carrier(task.context)) for task in tasks]
        try:
            await self.journal.save(records, owned=False)
        except StoreError as exc:
            Endings.shed(self, tasks, f"{reason}, and spilling it to the store failed ({exc})")
            return
        self.ledger.stored += len(tasks)
        self.telemetry.ended_lines(
            tasks, Outcome.RELEASED, logging.WARNING, "spilled to the store: %s", reason
        )
        for task in tasks:
            self.ledger.left_request += 1
            self.end(task, Outcome.RELEASED, attempts=0)

    def save_then_submit(self, task: Task, dispatcher: Dispatcher) -> None:
        """A durable task added after its response: stored first, then submitted."""
        owner = self.background
        if owner is None:
            self.shed([task], "it was added after its request had ended, with no executor")
            return
        owner.start_soon(self._save_then_submit, task, dispatcher)

    async def _save_then_submit(self, task: Task, dispatcher: Dispatcher) -> None:
        try:
            if task in await self.save([task]):
                return
        except StoreError as exc:
            self.not_stored([task], exc)
            return
        overflow = dispatcher.submit([task])
        if overflow:
            self.shed(overflow, "it was added after its response, and the queue was full")

    def not_stored(self, tasks: list[Task], exc: StoreError) -> None:
        """Durable ``tasks`` the store refused after their response: never run unstored,
        they end as failed (logged once per interval and name, counted, dead-lettered)."""
        for task in tasks:
            log_task_aggregated(
                self.telemetry.aggregator,
                f"could not be stored ({qualified_type(exc)})",
                logging.ERROR,
                task,
                "could not be stored (%s); not run",
                exc,
            )
            self.ledger.left_request += 1
            self.end(task, Outcome.FAILED, exc, attempts=0)

    async def claim_stored(
        self, limit: int, *, states: Sequence[str] = RUNNABLE, what: str = "claiming"
    ) -> list[Task]:
        """Take up to ``limit`` stored tasks in ``states`` that no live process owns, counted
        as added (and as recovered, a dead process's); none when the store fails, which is
        logged as ``what`` failed, once per interval (a broken store fails every look)."""
        assert self.journal is not None
        try:
            tasks, dead = await self.journal.claim(limit, self.ledger.add, states=states)
        except (StoreError, RuntimeError) as exc:
            self.telemetry.aggregator.emit(
                logging.ERROR,
                ("the durable store", f"{what} failed ({qualified_type(exc)})"),
                "after-response durable store: %s failed (%s)",
                (what, exc),
                counted="failures of",
            )
            return []
        for task, why in dead:  # logged and marked dead in the store by the journal
            self.telemetry.added(task)
            self.ledger.left_request += 1
            self.telemetry.unrun_span(task, Outcome.FAILED)
            self.end(task, Outcome.FAILED, why, attempts=task.attempt, marked=True)
        for task in tasks:
            self.telemetry.added(task)
            if task.recovered:
                self.ledger.recovered += 1
                self.telemetry.recovered(task)
        return tasks

    async def _recover(self) -> None:
        """Claim stored tasks nobody live owns (a dead process's, released, spilled), as
        room allows; at start-up, then every ``RECOVERY_INTERVAL`` seconds."""
        assert self.journal is not None
        while True:
            room = (
                self.max_concurrency
                + self.max_pending
                - self.ledger.running
                - (self.ledger.waiting + self._waiting)
            )
            if room > 0 and not self._closing:
                batch = min(room, CLAIM_BATCH)
                tasks = await self.claim_stored(batch)
                overflow = self.submit(tasks)
                if overflow:
                    self.release(overflow, "no room after all", taken=False)
                # A full batch: more may wait in the store; look again at once while there
                # is room (a backlog after a crash is claimed as fast as it can run, not a
                # batch a second), else as soon as a slot frees.
                self.backlog = len(tasks) >= batch
                if self.backlog and not overflow and batch < room:
                    continue
            else:
                self.backlog = self.backlog or room <= 0
            self.room_freed = anyio.Event()
            with anyio.move_on_after(RECOVERY_INTERVAL):
                await self.room_freed.wait()
