"""The one thread that writes to a SQLite store: group commit, heartbeats, purges.

Every write is an :class:`Op` on a queue. The thread takes everything queued while it was
busy (up to ``batch_max``) and runs it in one ``BEGIN IMMEDIATE`` transaction, so
concurrent requests share one commit and one fsync. Awaiting callers get their results
through their event loop (``call_soon_threadsafe``) only after the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import queue
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from . import _sqlite_queries as q
from ._aggregate import LogAggregator
from ._sqlite_schema import migrate
from ._store import StoreError

Run = Callable[[sqlite3.Connection, float], Any]
Settled = list[tuple["asyncio.Future[Any]", bool, Any]]

logger: Final = logging.getLogger("after_response.store")


class Op:
    """One unit of work: ``run(connection, now)`` inside a transaction, and the future (on
    its event loop) that receives the result once committed, if anyone waits for it."""

    __slots__ = ("future", "label", "loop", "run", "stop")

    def __init__(
        self,
        label: str,
        run: Run,
        future: asyncio.Future[Any] | None = None,
        *,
        stop: bool = False,
    ) -> None:
        self.label, self.run, self.future, self.stop = label, run, future, stop
        self.loop = future.get_loop() if future is not None else None


def store_error(path: str, what: str, exc: BaseException) -> StoreError:
    """A :class:`StoreError` naming the file, the operation and the SQLite error (SQLite's
    messages never quote bound values, so no task argument can leak through them)."""
    if isinstance(exc, StoreError):
        return exc
    hint = ""
    if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
        hint = " (does its directory exist, and may this user write there?)"
    code = getattr(exc, "sqlite_errorname", None) or type(exc).__name__  # Python 3.11+
    return StoreError(f"after-response store {path}: {what}: {exc}{hint} ({code})")


def connect(path: str, busy_timeout: float, synchronous: str) -> sqlite3.Connection:
    """A connection in WAL mode with the busy timeout and the ``synchronous`` level.

    Raises:
        StoreError: the file cannot be opened or cannot use WAL.
    """
    try:
        conn = sqlite3.connect(
            path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise store_error(path, "opening", exc) from None
    try:
        mode = _journal_mode_wal(conn, busy_timeout)
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(
                f"the journal mode stays {mode!r} instead of WAL; keep the file on a local disk"
            )
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    except sqlite3.Error as exc:
        conn.close()
        raise store_error(path, "opening", exc) from None
    return conn


def connect_read_only(path: str, busy_timeout: float) -> sqlite3.Connection:
    """A connection that cannot write: the file is not created, switched to WAL or changed.

    Raises:
        StoreError: the file cannot be opened.
    """
    uri = pathlib.Path(path).absolute().as_uri() + "?mode=ro"
    try:
        return sqlite3.connect(
            uri, uri=True, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise store_error(path, "opening read-only", exc) from None


def _journal_mode_wal(conn: sqlite3.Connection, busy_timeout: float) -> object:
    """Switch ``conn``'s file to WAL; the journal mode it is in after.

    When processes open a new file at the same moment (the workers of one server starting),
    SQLite can answer the switch "database is locked" at once instead of waiting in the busy
    handler: two connections that both read the file and both want to write it would wait
    for each other for ever. Try again, with short pauses, until ``busy_timeout`` has passed.
    """
    deadline = time.monotonic() + busy_timeout
    pause = 0.005
    while True:
        try:
            return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _settle(items: Settled) -> None:
    for future, ok, value in items:
        if not future.done():  # its caller may have been cancelled meanwhile
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


class Writer:
    """The writer thread of one open store, for one owner."""

    def __init__(
        self,
        path: str,
        connect: Callable[[], sqlite3.Connection],
        owner: str,
        *,
        heartbeat_interval: float,
        retention: float,
        batch_max: int,
    ) -> None:
        self.path, self.owner = path, owner
        self.commits = 0
        self.failed_writes = 0
        self._failures = LogAggregator(logger, 5.0)
        self._connect = connect
        self._heartbeat_interval = heartbeat_interval
        self._retention = retention
        self._batch_max = batch_max
        #: Whether the connection commits with synchronous=FULL (read once connected).
        self._full = False
        self._queue: queue.SimpleQueue[Op] = queue.SimpleQueue()
        self._pid, self._host = os.getpid(), socket.gethostname()
        self._thread = threading.Thread(target=self._run, name="after-response store")
        self._thread.daemon = True  # never keeps a process alive (unflushed marks are lost)
        self._started: asyncio.Future[None] | None = None

    def start(self) -> asyncio.Future[None]:
        """Start the thread; the future is done once the schema is ready and the owner is
        registered, or fails with :class:`StoreError`."""
        self._started = asyncio.get_running_loop().create_future()
        self._thread.start()
        return self._started

    def submit(self, op: Op) -> None:
        self._queue.put(op)

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        assert self._started is not None
        loop = self._started.get_loop()
        try:
            conn = self._connect()
            self._full = conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        except Exception as exc:
            loop.call_soon_threadsafe(_settle, [(self._started, False, exc)])
            return
        try:
            migrate(conn, self.path)
            self._transaction(conn, [self._housekeeping()], time.time())
        except Exception as exc:
            conn.close()
            error = store_error(self.path, "opening", exc)
            loop.call_soon_threadsafe(_settle, [(self._started, False, error)])
            return
        loop.call_soon_threadsafe(_settle, [(self._started, True, None)])
        try:
            self._serve(conn)
        except Exception:  # a bug: say so loudly rather than leave the store silently stuck
            logger.exception("the writer thread of the store %s stopped", self.path)
        finally:
            conn.close()

    def _housekeeping(self) -> Op:
        def run(conn: sqlite3.Connection, now: float) -> None:
            q.heartbeat(conn, self.owner, self._pid, self._host, now)
            q.purge_finished(conn, now - self._retention)

        return Op("heartbeat", run)

    def _serve(self, conn: sqlite3.Connection) -> None:
        next_housekeeping = time.monotonic() + self._heartbeat_interval
        while True:
            batch: list[Op] = []
            try:
                wait = max(0.0, next_housekeeping - time.monotonic())
                batch.append(self._queue.get(timeout=wait))
                while len(batch) < self._batch_max and not batch[-1].stop:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            if time.monotonic() >= next_housekeeping:
                batch.insert(0, self._housekeeping())
                next_housekeeping = time.monotonic() + self._heartbeat_interval
            if batch:
                self._commit(conn, batch)
                if batch[-1].stop:
                    self._failures.flush()
                    return
            # Its thread runs no loop to time the summary of failed writes: it wakes at least
            # once per heartbeat interval, and writes it then.
            self._failures.flush_due()

    def _commit(self, conn: sqlite3.Connection, batch: list[Op]) -> None:
        now = time.time()
        try:
            outcomes = [(True, value) for value in self._transaction(conn, batch, now)]
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError, ValueError, TypeError):
            # One op's own fault (a duplicate id, say): run each alone so the others commit.
            outcomes = [self._alone(conn, op, now) for op in batch]
        except Exception as exc:  # disk full, I/O error, locked: every op of the batch fails
            outcomes = [(False, exc)] * len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, Settled] = {}
        for op, (ok, value) in zip(batch, outcomes, strict=True):
            if not ok:
                value = store_error(self.path, op.label, value)
                if op.future is None:
                    self.failed_writes += 1
                    # A broken store fails every heartbeat and mark: one line per kind of
                    # write per interval, then a count.
                    self._failures.emit(
                        logging.ERROR,
                        ("the durable store", op.label.split(" ", 1)[0]),
                        "could not commit a batched write: %s",
                        (value,),
                        counted="failed writes to",
                    )
            if op.future is not None and op.loop is not None:
                by_loop.setdefault(op.loop, []).append((op.future, ok, value))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_settle, items)

    def _alone(self, conn: sqlite3.Connection, op: Op, now: float) -> tuple[bool, Any]:
        try:
            return True, self._transaction(conn, [op], now)[0]
        except Exception as exc:
            return False, exc

    def _transaction(self, conn: sqlite3.Connection, batch: list[Op], now: float) -> list[Any]:
        if not batch:
            return []
        # A batch nobody awaits (outcome marks, releases, heartbeats) is committed without
        # its own fsync: in WAL mode the next awaited (FULL) commit makes it durable too, and
        # a mark lost to a power cut meanwhile only means the task runs again, which
        # at-least-once delivery allows. It saves one fsync per task on the fast path.
        relaxed = self._full and all(op.future is None for op in batch)
        if relaxed:
            conn.execute("PRAGMA synchronous = NORMAL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                values = [op.run(conn, now) for op in batch]
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):  # keep the original error
                        conn.execute("ROLLBACK")
                raise
        finally:
            if relaxed:
                conn.execute("PRAGMA synchronous = FULL")
        self.commits += 1
        return values
