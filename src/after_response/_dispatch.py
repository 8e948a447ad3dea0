"""The dispatch seam: where a request's tasks go once its response is complete.

A collector hands its tasks to a :class:`Dispatcher` and knows nothing else about where
they run, in the spirit of httpx's transports: the whole pluggable surface is the protocol
below. Two implementations exist:

- :class:`~after_response._executor.Executor`: the in-process dispatcher, shared by every
  request between lifespan startup and shutdown (bounded, queued, retried, drained).
- :class:`~after_response._inline.InlineDispatcher`: without lifespan, each request's own
  ASGI call runs its tasks, under the executor's bounds and books, and returns when they end.

How the durable store and the engines plug in (see ``docs/architecture.md``):

- The **store** wraps a dispatcher. Durable tasks are written to it before the response
  starts (their records are plain data: ``TaskRecord`` plus a W3C trace context), then
  submitted to the wrapped dispatcher as any task; the wrapper records each outcome in the
  store, claims the tasks of dead processes and runs them through the same ``submit``.
- An **engine** (Celery, taskiq) takes durable tasks at the same seam: the executor's
  ``submit`` hands them to the outbox relay (``_relay``), which publishes their stored
  records to the broker instead of running them; non-durable tasks still run in-process.

The books (``Ledger``: added, pending, running, and one terminal state per task) belong to
the middleware, not to a dispatcher, so ``stats()`` holds whichever dispatcher ran a task.
"""

from __future__ import annotations

from typing import Protocol

from ._accounting import Stats
from ._task import Task


class Dispatcher(Protocol):
    """Takes tasks whose response is complete and sees them to a terminal state."""

    def submit(self, tasks: list[Task]) -> list[Task]:
        """Start or queue each task without waiting; return those that found no room."""
        ...

    async def submit_waiting(self, tasks: list[Task]) -> None:
        """Submit ``tasks``, waiting (bounded) for room; end the rest as shed."""
        ...

    async def stop(self, timeout: float | None) -> None:
        """Wait at most ``timeout`` seconds for the tasks, then end the rest."""
        ...

    def stats(self) -> Stats:
        """The counts, as ``AfterResponseMiddleware.stats()`` returns them."""
        ...
