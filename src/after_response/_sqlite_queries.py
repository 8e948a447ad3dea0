"""The SQL of :class:`~after_response.SQLiteStore`: the row codec, and each operation as a
function of a connection, run inside the writer's transaction (or on the reader connection
for reads). The schema and its migrations are in :mod:`._sqlite_schema`."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Final

from ._store import (
    DEAD,
    MAX_INTERRUPTED,
    OUTBOX,
    PUBLISHED,
    QUEUED,
    RETRY_WAIT,
    RUNNING,
    SUCCEEDED,
    SUSPECT_INTERRUPTED,
    StoredTask,
)

COLUMNS: Final = (
    "id, name, target, payload, options, request_method, request_path, trace_context, key,"
    " state, attempt, ready_at, owner, recovered, error_type, error_message, created_at,"
    " updated_at, finished_at, interrupted"
)
SELECT_ONE: Final = f"SELECT {COLUMNS} FROM tasks WHERE id = ?"
COUNT_BY_STATE: Final = "SELECT state, COUNT(*) FROM tasks GROUP BY state"
_EMPTY_PAYLOAD: Final = '{"args":[],"kwargs":{}}'
_FINISHED_KEEP_KEY: Final = (SUCCEEDED, PUBLISHED)


def encode(task: StoredTask) -> tuple[Any, ...]:
    """The task as a row in :data:`COLUMNS` order.

    Raises:
        TypeError: an argument, option or trace field is not JSON data (the message names
            the task and the type, never the value).
    """
    try:
        payload = json.dumps({"args": task.args, "kwargs": task.kwargs}, separators=(",", ":"))
        options = json.dumps(task.options, separators=(",", ":"))
        trace_context = json.dumps(task.trace_context, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"task {task.id} ({task.name}) cannot be stored: its arguments, options and "
            f"trace context must be JSON data ({type(exc).__name__}: {exc})"
        ) from None
    return (
        *(task.id, task.name, task.target, payload, options),
        *(task.request_method, task.request_path, trace_context, task.key, task.state),
        *(task.attempt, task.ready_at, task.owner, int(task.recovered), task.error_type),
        *(task.error_message, task.created_at, task.updated_at, task.finished_at),
        task.interrupted,
    )


def decode(row: Sequence[Any]) -> StoredTask:
    """A row in :data:`COLUMNS` order as a task."""
    payload = json.loads(row[3])
    return StoredTask(
        id=row[0],
        name=row[1],
        target=row[2],
        args=payload["args"],
        kwargs=payload["kwargs"],
        options=json.loads(row[4]),
        request_method=row[5],
        request_path=row[6],
        trace_context=json.loads(row[7]),
        key=row[8],
        state=row[9],
        attempt=row[10],
        ready_at=row[11],
        owner=row[12],
        recovered=bool(row[13]),
        error_type=row[14],
        error_message=row[15],
        created_at=row[16],
        updated_at=row[17],
        finished_at=row[18],
        interrupted=row[19],
    )


def select(conn: sqlite3.Connection, state: str | None, limit: int) -> list[Any]:
    if state is None:
        query = f"SELECT {COLUMNS} FROM tasks ORDER BY updated_at DESC LIMIT ?"
        return conn.execute(query, (limit,)).fetchall()
    query = f"SELECT {COLUMNS} FROM tasks WHERE state = ? ORDER BY updated_at DESC LIMIT ?"
    return conn.execute(query, (state, limit)).fetchall()


def insert(
    conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]], dedup_after: float
) -> list[str]:
    """Insert encoded rows; return the ids of those whose key is taken by a row that is
    unfinished, or finished (not dead) after ``dedup_after``."""
    deduplicated: list[str] = []
    placeholders = ", ".join("?" * len(rows[0])) if rows else ""
    for row in rows:
        key = row[8]
        if (
            key is not None
            and conn.execute(
                "SELECT 1 FROM tasks WHERE key = ? AND state != ?"
                " AND (finished_at IS NULL OR finished_at >= ?) LIMIT 1",
                (key, DEAD, dedup_after),
            ).fetchone()
        ):
            deduplicated.append(row[0])
            continue
        conn.execute(f"INSERT INTO tasks ({COLUMNS}) VALUES ({placeholders})", row)
    return deduplicated


def mark_running(conn: sqlite3.Connection, id: str, attempt: int, now: float) -> None:
    conn.execute(
        "UPDATE tasks SET state = ?, attempt = ?, updated_at = ? WHERE id = ?",
        (RUNNING, attempt, now, id),
    )


def mark_finished(conn: sqlite3.Connection, ids: Sequence[str], state: str, now: float) -> None:
    """Succeeded or published: rows without a key go; keyed rows stay, without their
    arguments, as the deduplication record until the retention purge."""
    for id in ids:
        if conn.execute("DELETE FROM tasks WHERE id = ? AND key IS NULL", (id,)).rowcount:
            continue
        conn.execute(
            "UPDATE tasks SET state = ?, owner = NULL, payload = ?, updated_at = ?,"
            " finished_at = ? WHERE id = ?",
            (state, _EMPTY_PAYLOAD, now, now, id),
        )


def mark_failed(
    conn: sqlite3.Connection,
    id: str,
    attempt: int,
    ready_at: float | None,
    error: tuple[str, str],
    now: float,
) -> None:
    """A failed attempt: retry_wait until ``ready_at``, or dead when ``ready_at`` is None."""
    if ready_at is None:
        conn.execute(
            "UPDATE tasks SET state = ?, attempt = ?, owner = NULL, error_type = ?,"
            " error_message = ?, updated_at = ?, finished_at = ? WHERE id = ?",
            (DEAD, attempt, *error, now, now, id),
        )
    else:
        conn.execute(
            "UPDATE tasks SET state = ?, attempt = ?, ready_at = ?, error_type = ?,"
            " error_message = ?, updated_at = ? WHERE id = ?",
            (RETRY_WAIT, attempt, ready_at, *error, now, id),
        )


def release(conn: sqlite3.Connection, ids: Sequence[str], now: float) -> None:
    """Unowned again; a run that was cut short goes back to queued, and its attempt does
    not count."""
    for id in ids:
        conn.execute(
            "UPDATE tasks SET owner = NULL, updated_at = ?,"
            " attempt = CASE state WHEN ? THEN MAX(attempt - 1, 0) ELSE attempt END,"
            " state = CASE state WHEN ? THEN ? ELSE state END"
            " WHERE id = ? AND state IN (?, ?, ?, ?)",
            (now, RUNNING, RUNNING, QUEUED, id, QUEUED, RUNNING, RETRY_WAIT, OUTBOX),
        )


def _claimable(states: Sequence[str], include_stale: bool) -> str:
    """The FROM and WHERE clauses selecting rows a claim may take, ready or not."""
    names = ", ".join(f":s{i}" for i in range(len(states)))
    stale = " OR o.owner IS NULL OR o.heartbeat_at < :stale_before" if include_stale else ""
    return (
        "FROM tasks t LEFT JOIN owners o ON o.owner = t.owner"
        f" WHERE t.state IN ({names}) AND (t.owner IS NULL{stale})"
    )


def claim(
    conn: sqlite3.Connection,
    owner: str,
    limit: int,
    states: Sequence[str],
    include_stale: bool,
    stale_before: float,
    now: float,
    max_suspects: int | None = None,
) -> list[StoredTask]:
    """Take the oldest ready rows nobody live owns; a row whose owner died is recovered.

    A claimed row becomes ``queued`` (an outbox row stays ``outbox``) with the new owner. A
    row still ``running`` under a dead owner was interrupted: ``interrupted`` counts one
    more, and the attempt cut short does not count (it runs again with its number). Of the
    suspects that would still run (see :data:`SUSPECT_INTERRUPTED`), at most
    ``max_suspects`` are taken, if given; the others stay for a later claim.
    """
    params: dict[str, Any] = {f"s{i}": state for i, state in enumerate(states)}
    params.update(now=now, limit=limit, stale_before=stale_before, owner=owner)
    columns = ", ".join(f"t.{c.strip()}" for c in COLUMNS.split(","))
    rows = conn.execute(
        f"SELECT {columns} {_claimable(states, include_stale)}"
        " AND t.ready_at <= :now ORDER BY t.ready_at LIMIT :limit",
        params,
    ).fetchall()
    claimed = []
    for row in rows:
        recovered = bool(row[13]) or row[12] is not None
        state = OUTBOX if row[9] == OUTBOX else QUEUED
        attempt, interrupted = row[10], row[19]
        if row[9] == RUNNING and row[12] is not None:
            attempt, interrupted = max(attempt - 1, 0), interrupted + 1
        if max_suspects is not None and SUSPECT_INTERRUPTED <= interrupted < MAX_INTERRUPTED:
            if max_suspects <= 0:
                continue
            max_suspects -= 1
        conn.execute(
            "UPDATE tasks SET owner = ?, state = ?, recovered = ?, attempt = ?, interrupted = ?,"
            " updated_at = ? WHERE id = ?",
            (owner, state, int(recovered), attempt, interrupted, now, row[0]),
        )
        claimed.append(
            replace(
                decode(row),
                owner=owner,
                state=state,
                recovered=recovered,
                attempt=attempt,
                interrupted=interrupted,
                updated_at=now,
            )
        )
    if include_stale:
        conn.execute(
            "DELETE FROM owners WHERE heartbeat_at < ? AND owner != ?", (stale_before, owner)
        )
    return claimed


def next_ready_at(
    conn: sqlite3.Connection, states: Sequence[str], stale_before: float
) -> float | None:
    params: dict[str, Any] = {f"s{i}": state for i, state in enumerate(states)}
    params["stale_before"] = stale_before
    row = conn.execute(f"SELECT MIN(t.ready_at) {_claimable(states, True)}", params).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def heartbeat(conn: sqlite3.Connection, owner: str, pid: int, host: str, now: float) -> None:
    """Register or refresh the owner (re-registering it if another process removed it)."""
    conn.execute(
        "INSERT INTO owners (owner, pid, host, heartbeat_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        (owner, pid, host, now),
    )


def unregister(conn: sqlite3.Connection, owner: str) -> None:
    conn.execute("DELETE FROM owners WHERE owner = ?", (owner,))


def purge_finished(conn: sqlite3.Connection, before: float) -> None:
    conn.execute(
        "DELETE FROM tasks WHERE state IN (?, ?) AND finished_at < ?",
        (*_FINISHED_KEEP_KEY, before),
    )


def dead_ids(conn: sqlite3.Connection, ids: Sequence[str] | None) -> list[str]:
    """The ids among ``ids`` (all when None) that are dead letters."""
    if ids is None:
        return [r[0] for r in conn.execute("SELECT id FROM tasks WHERE state = ?", (DEAD,))]
    query = "SELECT id FROM tasks WHERE id = ? AND state = ?"
    return [id for id in dict.fromkeys(ids) if conn.execute(query, (id, DEAD)).fetchone()]


def retry_dead(
    conn: sqlite3.Connection, ids: Sequence[str] | None, owner: str | None, now: float
) -> int:
    chosen = dead_ids(conn, ids)
    for id in chosen:
        conn.execute(
            "UPDATE tasks SET state = ?, owner = ?, attempt = 0, interrupted = 0, ready_at = ?,"
            " updated_at = ?, finished_at = NULL WHERE id = ?",
            (QUEUED, owner, now, now, id),
        )
    return len(chosen)


def purge_dead(conn: sqlite3.Connection, ids: Sequence[str] | None) -> int:
    chosen = dead_ids(conn, ids)
    conn.executemany("DELETE FROM tasks WHERE id = ?", [(id,) for id in chosen])
    return len(chosen)
