"""The durable record of a side effect, and the protocol a store implements.

A :class:`StoredTask` is plain data (a stable import path, JSON arguments, ids, the trace
context): everything a process that did not add the task needs to run it. Live objects
(the function, the request, the owner's runner) sit beside it, never inside it.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

QUEUED: Final = "queued"
"""Stored, not started (or released, or claimed and about to start)."""
RUNNING: Final = "running"
RETRY_WAIT: Final = "retry_wait"
"""Failed an attempt; the next one may start at ``ready_at``."""
SUCCEEDED: Final = "succeeded"
DEAD: Final = "dead"
"""A dead letter: its last attempt failed. It stays until retried or purged."""
OUTBOX: Final = "outbox"
"""To be published to an external engine by a relay."""
PUBLISHED: Final = "published"

STATES: Final = (QUEUED, RUNNING, RETRY_WAIT, SUCCEEDED, DEAD, OUTBOX, PUBLISHED)
UNFINISHED: Final = (QUEUED, RUNNING, RETRY_WAIT, OUTBOX)
#: What a runner claims by default: the unfinished states an engine relay does not own.
RUNNABLE: Final = (QUEUED, RUNNING, RETRY_WAIT)

MAX_INTERRUPTED: Final = 3
"""A task whose process died this many times while it ran is not run again: when claimed,
it becomes a dead letter (a side effect that crashes its process would crash every process
that takes it over, for ever)."""
SUSPECT_INTERRUPTED: Final = 2
"""A task whose process died this many times while it ran is a suspect: a process runs one
suspect at a time, so that a side effect that crashes its process does not take the others
down with it again and again (they would reach :data:`MAX_INTERRUPTED` with it)."""


class StoreError(RuntimeError):
    """The store could not do what was asked (disk full, file-size limit, read-only file,
    locked past the busy timeout, not a database...).

    The message names the file and the SQLite error, never a task's arguments.
    """


class SchemaVersionError(StoreError):
    """The store file was written by a newer after-response than the one running."""


def check_owner(method: str, owner: object) -> str:
    if not isinstance(owner, str) or not owner:
        raise TypeError(f"{method}(owner) expects a non-empty string, got {owner!r}")
    return owner


def check_limit(method: str, limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"{method}(limit={limit!r}) must be an int >= 1")
    return limit


def check_states(method: str, states: Sequence[str]) -> tuple[str, ...]:
    if isinstance(states, str) or not states or not set(states) <= set(STATES):
        raise ValueError(
            f"{method}(states={states!r}) must be a non-empty tuple of states among {STATES}"
        )
    return tuple(states)


def check_ids(method: str, ids: Sequence[str], all_dead: bool) -> builtins.list[str] | None:
    """The ids to act on, or None for "all"; exactly one of the two must be given."""
    if isinstance(ids, str):
        raise TypeError(f"{method}(ids) expects a list of ids, got the string {ids!r}")
    if bool(ids) == bool(all_dead):
        raise ValueError(f"{method}() needs either ids or all_dead=True, not both or neither")
    return None if all_dead else builtins.list(ids)


@dataclass(frozen=True)
class StoredTask:
    """One side effect as the store keeps it.

    Args:
        id: unique and stable across retries and replays (an idempotency id).
        name: the task's low-cardinality name, for logs, spans and the command line.
        target: where the function is imported from, ``"package.module:qualname"``.
        args: the positional arguments, JSON data.
        kwargs: the keyword arguments, JSON data.
        options: the task's options as JSON (timeout, retry, run_on_error); opaque here.
        request_method: the HTTP method of the request that added the task.
        request_path: the path of that request.
        trace_context: the W3C trace context carrier of that request's span.
        key: the idempotency key: a task whose key matches a stored unfinished task, or one
            that succeeded less than the store's retention ago, is not stored again.
        state: one of :data:`STATES`.
        attempt: how many attempts were already made.
        ready_at: the unix time at which the next attempt may start.
        owner: the process that holds the task, or ``None``.
        recovered: the task was taken over from a process that died.
        error_type: the last failure's exception type name.
        error_message: the last failure's message, already redacted.
        created_at, updated_at, finished_at: unix times.
        interrupted: how many times a process died while it ran the task (those attempts
            do not count in ``attempt``).
    """

    id: str
    name: str
    target: str
    args: list[Any] = field(default_factory=builtins.list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    request_method: str = ""
    request_path: str = ""
    trace_context: dict[str, str] = field(default_factory=dict)
    key: str | None = None
    state: str = QUEUED
    attempt: int = 0
    ready_at: float = field(default_factory=time.time)
    owner: str | None = None
    recovered: bool = False
    error_type: str | None = None
    error_message: str | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    interrupted: int = 0

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"StoredTask(state={self.state!r}) must be one of {STATES}")


@runtime_checkable
class Store(Protocol):
    """What the middleware needs from a durable store (``SQLiteStore`` implements it).

    Writes marked "batched" only enqueue: they are committed with the next group commit,
    and ``await flush()`` waits for them. Reads see committed data only.
    """

    async def open(self, owner: str) -> None:
        """Open the store for ``owner`` (idempotent) and start heartbeating it."""

    async def close(self) -> None:
        """Commit every queued write, unregister the owner and stop."""

    async def save(self, tasks: Sequence[StoredTask]) -> builtins.list[str]:
        """Store ``tasks`` durably; return the ids that were deduplicated by key."""
        ...

    def mark_running(self, id: str, attempt: int) -> None:
        """Batched: attempt number ``attempt`` started."""

    def mark_succeeded(self, id: str) -> None:
        """Batched: the task succeeded."""

    def mark_retry(
        self, id: str, attempt: int, ready_at: float, error_type: str, error_message: str
    ) -> None:
        """Batched: attempt ``attempt`` failed; the next may start at ``ready_at``."""

    def mark_dead(self, id: str, attempt: int, error_type: str, error_message: str) -> None:
        """Batched: the last attempt failed; the task becomes a dead letter."""

    def mark_published(self, ids: Sequence[str]) -> None:
        """Batched: the tasks were handed to an external engine."""

    def release(self, ids: Sequence[str]) -> None:
        """Batched: give the tasks up, unfinished, for the next process to claim."""

    async def flush(self) -> None:
        """Wait until every write enqueued so far is committed."""

    async def claim(
        self,
        owner: str,
        limit: int,
        *,
        states: Sequence[str] = RUNNABLE,
        include_stale: bool = True,
        max_suspects: int | None = None,
    ) -> builtins.list[StoredTask]:
        """Take up to ``limit`` ready tasks that nobody live owns (among them at most
        ``max_suspects`` suspects, if given: see :data:`SUSPECT_INTERRUPTED`)."""
        ...

    async def next_ready_at(self, *, states: Sequence[str] = RUNNABLE) -> float | None:
        """The earliest ``ready_at`` among the tasks a claim could take, if any."""
        ...
