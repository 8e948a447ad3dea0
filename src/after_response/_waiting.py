"""Waiting for room: a request's tasks that found the queue full wait in its call (bounded
by ``max_pending`` and ``overflow_timeout``, then shed); with backpressure, new requests wait
before their handler runs."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import anyio

from ._recovery import Durable
from ._task import Task

if TYPE_CHECKING:
    from ._tasks import Spawner


class Waiting(Durable):
    """Where tasks and requests wait for room (mixed into ``Executor``)."""

    overflow_timeout: float | None
    backpressure: bool
    #: Requests held by backpressure (and let in, or answered 503).
    held: int
    _room_waiters: deque[anyio.Event]
    _gate_waiters: deque[anyio.Event]

    async def submit_waiting(self, tasks: list[Task], owner: Spawner | None = None) -> None:
        """Submit ``tasks``, waiting up to ``overflow_timeout`` for room; shed what is left.

        Called by a request's ASGI call after its response was sent. At most
        ``max_pending`` tasks wait this way; tasks beyond that are shed at once.
        """
        if self.spill:  # disk is the buffer: nothing waits in memory
            self.shed(tasks, "the queue was full")
            return
        room = len(tasks) if self.backpressure else max(0, self.max_pending - self._waiting)
        if len(tasks) > room:
            # Counted with this request's own tasks that do get a place to wait.
            self.shed(
                tasks[room:],
                f"the queue was full and {self._waiting + room} task(s) already waited for "
                f"room, the most allowed (max_pending={self.max_pending})",
            )
            tasks = tasks[:room]
        if not tasks:
            return
        self._waiting += len(tasks)
        waiting = tasks
        try:
            with anyio.move_on_after(None if self.backpressure else self.overflow_timeout):
                while waiting and not self._closing:
                    room_event = anyio.Event()
                    self._room_waiters.append(room_event)
                    try:
                        await room_event.wait()
                    finally:
                        if not room_event.is_set():
                            self._room_waiters.remove(room_event)
                    before = len(waiting)
                    waiting = self.submit(waiting, owner)
                    self._waiting -= before - len(waiting)
                    if waiting and len(waiting) < before:
                        # Some of ours fit, the rest did not; a waiter with fewer tasks may.
                        # When none fit, wake nobody: a ring of wake-ups spins the loop.
                        self._wake_room_waiter()
        finally:
            self._waiting -= len(waiting)
            if waiting:
                self.shed(
                    waiting,
                    "shutdown began while it waited for room"
                    if self._closing
                    else f"the queue stayed full (max_pending={self.max_pending}) for "
                    f"overflow_timeout={self.overflow_timeout}s",
                )

    @property
    def saturated(self) -> bool:
        """Whether the queue is full (requests' tasks would have to wait for room)."""
        return self.background is not None and self.ledger.waiting + self._waiting >= max(
            1, self.max_pending
        )

    async def wait_for_room(self, timeout: float) -> bool:
        """Backpressure: wait until the queue has room, at most ``timeout``; ``False`` if it
        still had none."""
        self.held += 1
        with anyio.move_on_after(timeout):
            while self.saturated and not self._closing:
                room = anyio.Event()
                self._gate_waiters.append(room)
                try:
                    await room.wait()
                finally:
                    if not room.is_set():
                        self._gate_waiters.remove(room)
            return True
        return False

    def _wake_gate(self) -> None:
        """Let in as many held requests as the queue has room for (at least one)."""
        room = max(1, self.max_pending - self.ledger.waiting - self._waiting)
        while self._gate_waiters and room > 0:
            self._gate_waiters.popleft().set()
            room -= 1

    def _wake_room_waiter(self) -> None:
        if self._room_waiters:
            self._room_waiters.popleft().set()
