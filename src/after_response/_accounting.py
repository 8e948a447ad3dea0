"""The books: every task added ends in exactly one terminal state, and ``drain()`` waits on them.

A task is *added* by a request, then ends in exactly one terminal state (succeeded, failed,
timed out, discarded, shed or abandoned). Between the two it is *collected* (held by its
request), *pending* (queued, or waiting to retry) or *running*.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import anyio

from ._task import TERMINAL, Outcome, Task


@dataclass(frozen=True)
class Stats:
    """A snapshot of the counts; see ``AfterResponseMiddleware.stats()``.

    ``added == collected + pending + running + succeeded + failed + timed_out + discarded
    + shed + abandoned + deduplicated + released + handed_off`` holds at every snapshot. ``retried``
    counts extra attempts, not tasks. With a durable store: ``stored`` counts the durable
    tasks committed, ``recovered`` those taken over from a process that died (they are
    counted in ``added`` too), ``deduplicated`` the durable adds not stored again because of
    their key, and ``released`` the durable tasks left in the store at shutdown. With an
    engine: ``handed_off`` counts the durable tasks published to it (they run in its
    workers; ``pending`` includes those waiting in the outbox to be published), and
    ``publish_failures`` the failed attempts to start the engine or publish to it.
    ``dead_letters_lost`` counts the dead letters ``on_dead_letter`` never got because it
    was still busy when shutdown ended (their tasks are counted as they ended).
    """

    added: int
    collected: int
    pending: int
    running: int
    succeeded: int
    failed: int
    timed_out: int
    discarded: int
    shed: int
    abandoned: int
    retried: int
    deduplicated: int = 0
    released: int = 0
    stored: int = 0
    recovered: int = 0
    handed_off: int = 0
    publish_failures: int = 0
    dead_letters_lost: int = 0

    @property
    def finished(self) -> int:
        """Tasks in a terminal state."""
        return (
            self.succeeded
            + self.failed
            + self.timed_out
            + self.discarded
            + self.shed
            + self.abandoned
            + self.deduplicated
            + self.released
            + self.handed_off
        )


class _Waiter:
    __slots__ = ("event", "last_seq", "remaining")

    def __init__(self, last_seq: int, remaining: int) -> None:
        self.last_seq = last_seq
        self.remaining = remaining
        self.event = anyio.Event()


class Ledger:
    """Counts for one middleware. Written on the event loop, but for ``add()``, which may
    run in a worker thread (a sync handler): that one count takes a lock."""

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self.added = 0
        self.counts = dict.fromkeys(TERMINAL, 0)
        self.retried = 0
        self.running = 0
        self.queued = 0
        self.retry_waiting = 0
        #: Waiting for their name's own limits (``max_concurrency``, ``rate_limit``).
        self.parked = 0
        #: Tasks that left their request: handed to a dispatcher, or ended before (shed,
        #: discarded, abandoned with their request).
        self.left_request = 0
        self._waiters: list[_Waiter] = []
        self.stored = 0
        self.recovered = 0
        #: Durable tasks waiting for the engine relay to publish them.
        self.outbox = 0
        self.publish_failures = 0
        self.dead_letters_lost = 0

    def add(self) -> int:
        """Count a task a request added; its sequence number."""
        with self._lock:
            self.added += 1
            return next(self._seq)

    @property
    def outstanding(self) -> int:
        """Tasks added that have not reached a terminal state yet."""
        return self.added - sum(self.counts.values())

    @property
    def waiting(self) -> int:
        """Tasks waiting in the executor (queued, backing off, parked): what its
        ``max_pending`` bounds. The outbox is not the executor's to bound."""
        return self.queued + self.retry_waiting + self.parked

    @property
    def pending(self) -> int:
        """Every task waiting: in the executor, or in the outbox for the engine's relay."""
        return self.waiting + self.outbox

    def end(self, task: Task, outcome: Outcome) -> None:
        """Count ``task`` in its terminal state; wake the drains it was the last one for."""
        self.counts[outcome] += 1
        if self._waiters:
            for waiter in self._waiters:
                if task.seq <= waiter.last_seq:
                    waiter.remaining -= 1
                    if waiter.remaining == 0:
                        waiter.event.set()
            self._waiters = [w for w in self._waiters if w.remaining > 0]

    async def drain(self, timeout: float | None) -> bool:
        """Wait until every task added before this call has ended; ``False`` on timeout.

        Tasks added meanwhile are not waited for, so a drain under steady load returns.
        """
        with self._lock:
            last_seq, outstanding = self.added, self.outstanding
        if outstanding == 0:
            return True
        # Every task still outstanding was added before now (sequence numbers only grow).
        waiter = _Waiter(last_seq, outstanding)
        self._waiters.append(waiter)
        with anyio.move_on_after(timeout):
            await waiter.event.wait()
            return True
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        return False

    def stats(self) -> Stats:
        counts = self.counts
        return Stats(
            added=self.added,
            collected=self.added - self.left_request,
            pending=self.pending,
            running=self.running,
            succeeded=counts[Outcome.SUCCEEDED],
            failed=counts[Outcome.FAILED],
            timed_out=counts[Outcome.TIMED_OUT],
            discarded=counts[Outcome.DISCARDED],
            shed=counts[Outcome.SHED],
            abandoned=counts[Outcome.ABANDONED],
            retried=self.retried,
            deduplicated=counts[Outcome.DEDUPLICATED],
            released=counts[Outcome.RELEASED],
            stored=self.stored,
            recovered=self.recovered,
            handed_off=counts[Outcome.HANDED_OFF],
            publish_failures=self.publish_failures,
            dead_letters_lost=self.dead_letters_lost,
        )
