"""How tasks end: the one place a task reaches its terminal state, with its log line, span,
count, per-request callback and dead letter."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ._accounting import Ledger
from ._dead_letters import DeadLetters
from ._errors import TaskAbandonedError, TaskShedError
from ._journal import Journal
from ._logs import log_task_aggregated
from ._task import DeadLetter, Outcome, Task
from ._telemetry import Telemetry


class Endings:
    """The terminal states, shared by every dispatcher of one middleware."""

    def __init__(
        self,
        ledger: Ledger,
        telemetry: Telemetry,
        dead_letters: DeadLetters,
        journal: Journal | None,
    ) -> None:
        self.ledger = ledger
        self.telemetry = telemetry
        self.dead_letters = dead_letters
        #: The durable store's bookkeeping, if the middleware has a store.
        self.journal = journal
        #: Shutdown's deadline has passed: durable tasks are released, not abandoned.
        self._closing = False

    @property
    def closing(self) -> bool:
        """Shutdown's deadline has passed."""
        return self._closing

    def end(
        self,
        task: Task,
        outcome: Outcome,
        exc: BaseException | None = None,
        *,
        attempts: int,
        marked: bool = False,
    ) -> None:
        """``task`` ends with ``outcome``: counted, its metric, its request told, its end
        written to the store (unless it is ``marked`` there already), its dead letter."""
        if task.done:  # a task abandoned at the deadline that finished after all
            return
        task.done = True
        self.ledger.end(task, outcome)
        if self.telemetry.on:
            self.telemetry.finished(task, outcome)
        on_end, task.on_end = task.on_end, None
        if on_end is not None:
            on_end()
        journal = self.journal
        if journal is not None and task.record.durable and not marked:
            if outcome is Outcome.SUCCEEDED:
                journal.succeeded(task)
            elif exc is not None and outcome is not Outcome.RELEASED:
                journal.dead(task, exc)
        if exc is not None and self.dead_letters.wanted:
            self.dead_letters.submit(
                task, DeadLetter(task.record.name, task.record.id, exc, attempts, outcome.value)
            )

    def release(self, tasks: Iterable[Task], reason: str, *, taken: bool = True) -> None:
        """Durable tasks this process will not finish: left in the store, unowned, for the
        next process (or a live one) to claim. Not an error: nothing is lost."""
        tasks = list(tasks)
        assert self.journal is not None
        self.journal.release(tasks)
        self.telemetry.ended_lines(
            tasks, Outcome.RELEASED, logging.WARNING, "released to the store: %s", reason
        )
        for task in tasks:
            if not taken:
                self.ledger.left_request += 1
            self.end(task, Outcome.RELEASED, attempts=task.attempt - 1)

    def shed(self, tasks: Iterable[Task], reason: str) -> None:
        """End tasks that found no room (or no executor): logged, counted, dead-lettered.
        Durable tasks are not shed: they stay in the store, for when there is room."""
        tasks = list(tasks)
        if self.journal is not None and any(task.record.durable for task in tasks):
            self.release(
                [task for task in tasks if task.record.durable],
                f"{reason}; it waits in the store for room",
                taken=False,
            )
            tasks = [task for task in tasks if not task.record.durable]
        self.telemetry.unrun(tasks, Outcome.SHED, logging.ERROR, "shed: %s", reason)
        # The error is the dead letter's: without a hook, none is built (a flood sheds
        # thousands of tasks at once).
        wanted = self.dead_letters.wanted
        for task in tasks:
            self.ledger.left_request += 1
            error = TaskShedError(f"{task.record.name} was shed: {reason}") if wanted else None
            self.end(task, Outcome.SHED, error, attempts=0)

    def discard(self, tasks: list[Task], reason: str) -> None:
        """End tasks of a failed request by policy (not an error): logged by name, counted."""
        count = len(tasks)
        for number, task in enumerate(tasks, 1):
            self.ledger.left_request += 1
            self.telemetry.unrun(
                [task],
                Outcome.DISCARDED,
                logging.WARNING,
                "discarded (%d of %d of this request) because %s (pass run_on_error=True to "
                "run it anyway)",
                number,
                count,
                reason,
            )
            self.end(task, Outcome.DISCARDED, attempts=0)

    def _releasing(self, task: Task) -> bool:
        """Whether shutdown gives ``task`` back to the store instead of abandoning it."""
        return self._closing and task.record.durable and self.journal is not None

    def abandon(self, tasks: Iterable[Task], reason: str, *, taken: bool) -> None:
        """End tasks that will never run: their request's call was cancelled before handing
        them over (``taken=False``), or shutdown's deadline passed while they waited (durable
        ones are then released to the store instead)."""
        tasks = list(tasks)
        released = [task for task in tasks if self._releasing(task)]
        if released:
            self.release(released, reason, taken=taken)
            tasks = [task for task in tasks if not self._releasing(task)]
        self.telemetry.unrun(tasks, Outcome.ABANDONED, logging.ERROR, "abandoned: %s", reason)
        for task in tasks:
            if not taken:
                self.ledger.left_request += 1
            error = TaskAbandonedError(f"{task.record.name} was abandoned: {reason}")
            self.end(task, Outcome.ABANDONED, error, attempts=task.attempt - 1)

    def abandon_running(self, task: Task, reason: str) -> None:
        """End a task whose attempt was cancelled (released instead, if durable at shutdown)."""
        if task.done:
            return
        if self._releasing(task):
            self.release([task], reason)
            return
        # Aggregated: a shutdown that cancels a thousand running tasks writes a line per name.
        log_task_aggregated(
            self.telemetry.aggregator,
            f"abandoned: {reason}",
            logging.ERROR,
            task,
            "abandoned: %s",
            reason,
        )
        error = TaskAbandonedError(f"{task.record.name} was abandoned: {reason}")
        self.end(task, Outcome.ABANDONED, error, attempts=task.attempt)
