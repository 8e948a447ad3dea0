"""The embedded durable store: one SQLite file, one writer thread with group commit.

Here: the options, opening and closing, the reads and the dead-letter commands. The task
operations the middleware calls (save, marks, release, claim) are in ``_sqlite_tasks``.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from . import _sqlite_queries as q
from ._checks import check_int, check_seconds
from ._sqlite_schema import check_store
from ._sqlite_tasks import TaskOperations
from ._sqlite_writer import Op, Writer, connect, connect_read_only, store_error
from ._store import DEAD, STATES, StoredTask, check_ids, check_limit, check_owner

T = TypeVar("T")

_SYNCHRONOUS: Final = ("FULL", "NORMAL")


def _check_seconds(name: str, value: object) -> float:
    return check_seconds(f"SQLiteStore({name}=...)", value, or_none=False)


class SQLiteStore(TaskOperations):
    """A durable store for side effects in one SQLite file on this host.

    ``AfterResponseMiddleware(app, store=SQLiteStore("after_response.sqlite3"))``: the file
    is created on first use (its directory must exist), relative to the working directory
    unless the path is absolute. Keep it on a local disk that outlives the process (not a
    container's throwaway layer), next to the app, and give every worker process of the app
    the same path: they share the work and take over each other's tasks.

    **Same host only.** SQLite's locking needs one kernel: never put the file on a network
    filesystem (NFS, SMB, EFS), nor on a volume shared between containers or hosts.

    **Durability.** The file is in WAL mode. With ``synchronous="FULL"`` (the default)
    every commit is flushed to the disk: a stored task survives a power cut. ``"NORMAL"``
    commits faster and survives a crash or ``kill -9`` of the process, but a power cut or
    a kernel crash may lose the last commits.

    **Delivery is at-least-once.** A task whose process dies (its heartbeat is older than
    ``owner_timeout``) is taken over by another process and runs again, even if the dead
    one had finished all but recording it: use the task's id as an idempotency key.

    Args:
        path: the database file.
        synchronous: ``"FULL"`` or ``"NORMAL"``, see above.
        busy_timeout: seconds to wait for another process's write lock before a write
            fails with :class:`StoreError`.
        heartbeat_interval: seconds between two heartbeats (and retention purges).
        owner_timeout: seconds without a heartbeat after which a process counts as dead
            and its unfinished tasks may be claimed by another.
        retention: seconds a succeeded task with a key is kept: the deduplication window.
        batch_max: the most writes committed in one transaction.

    Raises:
        TypeError, ValueError: an argument is of the wrong type or out of range.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 5.0,
        heartbeat_interval: float = 5.0,
        owner_timeout: float = 25.0,
        retention: float = 86400.0,
        batch_max: int = 1000,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
            raise TypeError(f"SQLiteStore(path) must be a str or a pathlib.Path, got {path!r}")
        self._path = os.fspath(path)
        if self._path in ("", ":memory:") or self._path.startswith("file:"):
            raise ValueError(
                f"SQLiteStore(path={self._path!r}) must name a file on a local disk, such as "
                '"after_response.sqlite3": a durable store cannot live in memory'
            )
        modes = '"FULL" (survives a power cut) or "NORMAL" (survives a process crash)'
        if not isinstance(synchronous, str):
            raise TypeError(
                f"SQLiteStore(synchronous=...) must be {modes}, got {type(synchronous).__name__}"
            )
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(f"SQLiteStore(synchronous={synchronous!r}) must be {modes}")
        self._synchronous = synchronous.upper()
        self._busy_timeout = _check_seconds("busy_timeout", busy_timeout)
        self._heartbeat_interval = _check_seconds("heartbeat_interval", heartbeat_interval)
        self._owner_timeout = _check_seconds("owner_timeout", owner_timeout)
        self._retention = _check_seconds("retention", retention)
        if self._owner_timeout <= self._heartbeat_interval:
            raise ValueError(
                f"SQLiteStore(owner_timeout={owner_timeout!r}) must be longer than "
                f"heartbeat_interval={heartbeat_interval!r}, or live processes look dead; "
                "three intervals or more is safe"
            )
        if check_int("SQLiteStore(batch_max=...)", batch_max, "an int >= 1") < 1:
            raise ValueError(f"SQLiteStore(batch_max={batch_max!r}) must be an int >= 1")
        self._batch_max = batch_max
        self._owner: str | None = None
        self._opened: asyncio.Future[None] | None = None
        self._writer = None
        self._closing = False
        self._reader = None
        self._reader_lock = threading.Lock()
        self._commits = self._failed_writes = 0  # of writers that have stopped

    def __repr__(self) -> str:
        return f"SQLiteStore({self._path!r}, synchronous={self._synchronous!r})"

    @property
    def path(self) -> str:
        """The database file's path, as given."""
        return self._path

    @property
    def commits(self) -> int:
        """How many transactions this store's writer has committed."""
        return self._commits + (self._writer.commits if self._writer else 0)

    @property
    def failed_writes(self) -> int:
        """How many batched writes (marks, releases) could not be committed (each logged)."""
        return self._failed_writes + (self._writer.failed_writes if self._writer else 0)

    async def open(self, owner: str) -> None:
        """Create or migrate the schema, register ``owner`` and start the writer thread,
        which heartbeats the owner every ``heartbeat_interval``. Idempotent.

        Raises:
            StoreError: the file cannot be opened, is not a database, cannot use WAL, or
                has a newer schema (:class:`SchemaVersionError`).
        """
        owner = check_owner("open", owner)
        if self._opened is None and self._reader is not None:
            raise RuntimeError(f"{self!r} is open read-only: close() it before open(owner)")
        if self._opened is not None:
            if owner != self._owner:
                raise RuntimeError(
                    f"{self!r} is already open for owner {self._owner!r}; "
                    "one store object serves one owner"
                )
            return await asyncio.shield(self._opened)
        writer = Writer(
            self._path,
            self._connect,
            owner,
            heartbeat_interval=self._heartbeat_interval,
            retention=self._retention,
            batch_max=self._batch_max,
        )
        self._owner, self._writer, self._closing = owner, writer, False
        self._opened = writer.start()
        try:
            await asyncio.shield(self._opened)
            self._reader = self._connect()
        except BaseException:
            # Cancelled or failed: a writer that did start must stop before we forget it.
            writer.submit(Op("open abandoned", lambda c, n: q.unregister(c, owner), stop=True))
            writer.join()
            self._owner = self._opened = self._writer = None
            raise

    def open_read_only(self) -> None:
        """Open the file for reading only, for tools that inspect a store (the
        ``after-response`` command line): :meth:`get`, :meth:`list`, :meth:`dead_letters` and
        :meth:`count_by_state` work; nothing is written (no schema created or migrated, no
        owner registered, no writer thread). :meth:`close` closes it.

        Raises:
            StoreError: the file does not exist, cannot be opened, is not a database, is not
                an after-response store, or has a newer schema (:class:`SchemaVersionError`).
            RuntimeError: the store is open already.
        """
        if self._reader is not None or self._writer is not None:
            raise RuntimeError(f"{self!r} is open already")
        conn = connect_read_only(self._path, self._busy_timeout)
        try:
            check_store(conn, self._path)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise store_error(self._path, "opening read-only", exc) from None
            raise
        self._reader = conn

    async def close(self) -> None:
        """Commit every queued write, unregister the owner and stop the writer thread (or,
        opened read-only, close the file).

        Tasks still owned by this owner become claimable by other processes (as recovered
        tasks); :meth:`release` them first to hand them over as not started.
        """
        writer = self._writer
        if writer is None:
            with self._reader_lock:
                if self._reader is not None:  # opened read-only
                    self._reader.close()
                    self._reader = None
            return
        if self._closing:
            return
        self._closing = True
        try:
            await self._call("closing", lambda conn, now: q.unregister(conn, writer.owner), True)
        finally:
            writer.join()
            with self._reader_lock:
                if self._reader is not None:
                    self._reader.close()
            self._commits += writer.commits
            self._failed_writes += writer.failed_writes
            self._reader = self._owner = self._opened = self._writer = None

    def _connect(self) -> sqlite3.Connection:
        return connect(self._path, self._busy_timeout, self._synchronous)

    async def retry_dead(
        self, ids: Sequence[str] = (), *, all_dead: bool = False, owner: str | None = None
    ) -> int:
        """Make dead letters ready again: queued, attempt 0 (and not interrupted), ready now,
        owned by ``owner`` (None: the first live process to claim them). Give ``ids`` or
        ``all_dead=True``.

        Returns:
            How many dead letters were retried (ids that are not dead letters are skipped).
        """
        chosen = check_ids("retry_dead", ids, all_dead)
        owner = None if owner is None else check_owner("retry_dead", owner)
        return await self._call("retry_dead", lambda c, now: q.retry_dead(c, chosen, owner, now))

    async def purge_dead(self, ids: Sequence[str] = (), *, all_dead: bool = False) -> int:
        """Delete dead letters, given by ``ids`` or ``all_dead=True``; return how many."""
        chosen = check_ids("purge_dead", ids, all_dead)
        return await self._call("purge_dead", lambda c, now: q.purge_dead(c, chosen))

    def _read(self, what: str, read: Callable[[sqlite3.Connection], T]) -> T:
        """Committed data, on the caller's thread, without waiting for the writer."""
        with self._reader_lock:
            if self._reader is None:
                raise RuntimeError(f"{self!r} is not open: await store.open(owner) first")
            try:
                return read(self._reader)
            except sqlite3.Error as exc:
                raise store_error(self._path, what, exc) from None

    def count_by_state(self) -> dict[str, int]:
        """How many tasks are in each of the states (every state is a key)."""
        rows = self._read("counting", lambda c: c.execute(q.COUNT_BY_STATE).fetchall())
        return {state: 0 for state in STATES} | dict(rows)

    def get(self, id: str) -> StoredTask | None:
        """The task with this id, or None."""
        row = self._read("reading", lambda c: c.execute(q.SELECT_ONE, (id,)).fetchone())
        return None if row is None else q.decode(row)

    def dead_letters(self, limit: int = 100) -> builtins.list[StoredTask]:
        """Dead letters, the most recent first."""
        return self.list(DEAD, limit)

    def list(self, state: str | None = None, limit: int = 100) -> builtins.list[StoredTask]:
        """Tasks in ``state`` (any state if None), the most recently updated first."""
        if state is not None and state not in STATES:
            raise ValueError(f"list(state={state!r}) must be None or one of {STATES}")
        limit = check_limit("list", limit)
        rows = self._read("listing", lambda c: q.select(c, state, limit))
        return [q.decode(row) for row in rows]
