"""What a side effect *is*, as plain data: the part of a task that can be stored or sent.

A :class:`TaskRecord` describes one call (what to run, with what, under which options, for
which request) and never changes. How far the call has got (attempt, ready time, owner)
lives beside it, in the live :class:`~after_response._task.Task`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from ._limits import Limits
from ._options import Retry


class RequestInfo(NamedTuple):
    """What logs say about the request a task came from: never headers, body or query."""

    method: str
    path: str


@dataclasses.dataclass(slots=True, eq=False, repr=False)
class TaskRecord:
    """One side-effect call, immutable (its attributes are ``Final``: mypy refuses a write).

    ``target`` is the function's stable import name (``"module:qualname"``) where it has one
    (``None`` for lambdas, closures, partials and callable objects): what a store or an
    engine needs to find the function again in another process. ``trace_context`` is the
    W3C trace context at ``add()``, filled in for tasks that leave the process; in-process
    tasks carry the live context instead.

    A dataclass with slots rather than a named tuple: a task's path reads its fields a dozen
    times, and Python specialises reads of slots, not of a named tuple's fields. Not frozen:
    a frozen dataclass sets each field through ``object.__setattr__`` when it is made.
    """

    id: Final[str]
    name: Final[str]
    target: Final[str | None]
    args: Final[tuple[Any, ...]]
    kwargs: Final[dict[str, Any]]
    timeout: Final[float | None]
    retry: Final[Retry]
    run_on_error: Final[bool]
    request: Final[RequestInfo]
    trace_context: Final[dict[str, str] | None] = None
    #: Stored before the response completes, replayed after a crash (needs a store).
    durable: Final[bool] = False
    #: Idempotency key: a durable add whose key matches a stored task is not stored again.
    key: Final[str | None] = None
    #: Per task name: how many run at once, how often one starts (``None``: no limit).
    limits: Final[Limits | None] = None

    def replace(self, *, trace_context: dict[str, str] | None) -> TaskRecord:
        """A copy with another trace context (the one field a record gains on its way out)."""
        return dataclasses.replace(self, trace_context=trace_context)

    def __repr__(self) -> str:
        # Never the arguments: they carry emails, codes and tokens.
        return f"<TaskRecord {self.name} #{self.id}>"


def _new_prefix() -> str:
    return os.urandom(6).hex()


class _Ids:
    """Task ids: a random per-process prefix and a counter. Unique across processes (and
    across forks: a forked child draws a new prefix) at the cost of a string format."""

    def __init__(self) -> None:
        self.next: Callable[[], str]
        self.reset()

    def reset(self) -> None:
        # An iterator of formatted ids: next() on it runs no Python frame.
        self.next = map(f"{_new_prefix()}-%x".__mod__, itertools.count(1)).__next__


#: Task ids: ``task_ids.next()`` is a new one, unique across processes and restarts.
task_ids: Final = _Ids()
if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=task_ids.reset)
