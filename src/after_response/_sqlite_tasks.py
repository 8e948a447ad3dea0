"""The task operations of the SQLite store, through its writer thread: what the middleware
calls to save its durable tasks, record how each attempt ends, release and claim them."""

from __future__ import annotations

import asyncio
import builtins
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from . import _sqlite_queries as q
from ._sqlite_writer import Op, Writer
from ._store import (
    PUBLISHED,
    RUNNABLE,
    SUCCEEDED,
    StoredTask,
    check_limit,
    check_owner,
    check_states,
)

T = TypeVar("T")


class TaskOperations:
    """What :class:`~after_response._store.Store` asks of a store besides ``open`` and
    ``close``, for :class:`~after_response.SQLiteStore` (its one subclass, which sets the
    attributes below): batched writes are enqueued to the writer thread; the others wait
    for their commit."""

    _retention: float
    _owner_timeout: float
    _writer: Writer | None
    _closing: bool
    _reader: sqlite3.Connection | None

    def _enqueue(self, label: str, run: Callable[[sqlite3.Connection, float], Any]) -> None:
        self._writer_or_raise().submit(Op(label, run))

    async def _call(
        self, label: str, run: Callable[[sqlite3.Connection, float], T], stop: bool = False
    ) -> T:
        writer = self._writer_or_raise() if not stop else self._writer
        assert writer is not None
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        writer.submit(Op(label, run, future, stop=stop))
        return await future

    def _writer_or_raise(self) -> Writer:
        if self._writer is None or self._closing:
            state = "closed" if self._closing else "open read-only" if self._reader else "not open"
            raise RuntimeError(f"{self!r} is {state}: await store.open(owner) first")
        return self._writer

    async def save(self, tasks: Sequence[StoredTask]) -> builtins.list[str]:
        """Store ``tasks``; return once committed (and flushed to disk per ``synchronous``).

        Saves queued while the writer is busy share one transaction (group commit). A task
        whose ``key`` matches an unfinished task, or one that succeeded within
        ``retention``, is not inserted; neither is a second task with the same key.

        A caller cancelled while it waits does not withdraw the save: it may still commit.

        Returns:
            The ids of the tasks that were not inserted because of their key.

        Raises:
            StoreError: nothing of ``tasks`` was stored (disk full, file-size limit,
                read-only file, locked past ``busy_timeout``, duplicate id...).
            TypeError: a task is not a :class:`StoredTask` or is not JSON data.
        """
        for task in tasks:
            if not isinstance(task, StoredTask):
                raise TypeError(f"save() expects StoredTask records, got {type(task).__name__}")
        if not tasks:
            return []
        rows = [q.encode(task) for task in tasks]
        dedup_window = self._retention
        return await self._call(
            f"saving {len(rows)} task(s)",
            lambda conn, now: q.insert(conn, rows, now - dedup_window),
        )

    def mark_running(self, id: str, attempt: int) -> None:
        """Batched, no await: attempt number ``attempt`` (from 1) of task ``id`` started. If
        its owner dies before it ends, the next claim counts it as interrupted."""
        self._enqueue(f"mark_running {id}", lambda c, now: q.mark_running(c, id, attempt, now))

    def mark_succeeded(self, id: str) -> None:
        """Batched, no await: task ``id`` succeeded. A row without a key is deleted; a keyed
        row is kept without its arguments for ``retention`` seconds (the dedup window)."""
        self._enqueue(
            f"mark_succeeded {id}", lambda c, now: q.mark_finished(c, [id], SUCCEEDED, now)
        )

    def mark_retry(
        self, id: str, attempt: int, ready_at: float, error_type: str, error_message: str
    ) -> None:
        """Batched, no await: attempt ``attempt`` failed; the next may start at ``ready_at``
        (unix time). The task stays with its owner. ``error_message`` must be redacted."""
        error = (error_type, error_message)
        self._enqueue(
            f"mark_retry {id}", lambda c, now: q.mark_failed(c, id, attempt, ready_at, error, now)
        )

    def mark_dead(self, id: str, attempt: int, error_type: str, error_message: str) -> None:
        """Batched, no await: the last attempt failed; the task becomes a dead letter, kept
        with its arguments until retried or purged. ``error_message`` must be redacted."""
        error = (error_type, error_message)
        self._enqueue(
            f"mark_dead {id}", lambda c, now: q.mark_failed(c, id, attempt, None, error, now)
        )

    def mark_published(self, ids: Sequence[str]) -> None:
        """Batched, no await: outbox tasks handed to an external engine (kept like
        succeeded ones)."""
        ids = builtins.list(ids)
        self._enqueue(
            f"mark_published {len(ids)}", lambda c, now: q.mark_finished(c, ids, PUBLISHED, now)
        )

    def release(self, ids: Sequence[str]) -> None:
        """Batched, no await: give unfinished tasks up for the next process (at shutdown).
        Their owner becomes NULL; a running task goes back to queued (the attempt it was
        cut short in does not count), others keep their state. A later claim does not count
        them as recovered, nor as interrupted."""
        ids = builtins.list(ids)
        self._enqueue(f"release {len(ids)}", lambda c, now: q.release(c, ids, now))

    async def flush(self) -> None:
        """Wait until every write enqueued so far is committed."""
        await self._call("flush", lambda conn, now: None)

    async def claim(
        self,
        owner: str,
        limit: int,
        *,
        states: Sequence[str] = RUNNABLE,
        include_stale: bool = True,
        max_suspects: int | None = None,
    ) -> builtins.list[StoredTask]:
        """Take up to ``limit`` tasks, oldest ``ready_at`` first, that are in ``states``,
        ready (``ready_at`` has passed), and owned by nobody or, with ``include_stale``, by
        a process whose heartbeat is older than ``owner_timeout`` (or gone).

        The returned tasks belong to ``owner``; a claimed task is ``queued`` (an outbox one
        stays ``outbox``). ``recovered`` is True for a task taken from a dead owner, and
        stays True for a task recovered before; a released or spilled task (owner NULL) is
        not recovered. Stale owners are unregistered in the same transaction.

        A task still ``running`` when its owner died was interrupted: its ``interrupted``
        count goes up by one, and its ``attempt`` does not (the attempt cut short runs again
        with the same number). With ``max_suspects``, at most that many tasks interrupted
        :data:`~after_response._store.SUSPECT_INTERRUPTED` times or more (but fewer than
        :data:`~after_response._store.MAX_INTERRUPTED`) are taken; the others stay.
        """
        owner, limit = check_owner("claim", owner), check_limit("claim", limit)
        states = check_states("claim", states)
        timeout = self._owner_timeout
        return await self._call(
            f"claim by {owner}",
            lambda c, now: q.claim(
                c, owner, limit, states, include_stale, now - timeout, now, max_suspects
            ),
        )

    async def next_ready_at(self, *, states: Sequence[str] = RUNNABLE) -> float | None:
        """The earliest ``ready_at`` (unix time) among the tasks a claim could take, now or
        later; None when there are none. Runs after the writes enqueued before it."""
        states = check_states("next_ready_at", states)
        timeout = self._owner_timeout
        return await self._call(
            "next_ready_at", lambda c, now: q.next_ready_at(c, states, now - timeout)
        )
