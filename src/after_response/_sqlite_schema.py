"""The schema of :class:`~after_response.SQLiteStore`'s file: its migrations, its version,
and the checks that a file is a store this code can read (without writing) or migrate."""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Final

from ._store import SchemaVersionError, StoreError

#: Migration ``n`` (1-based) brings a file from schema version ``n - 1`` to ``n``; a new
#: schema change is a new entry at the end, never an edit of a released one.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE tasks (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, target TEXT NOT NULL,
            payload TEXT NOT NULL, options TEXT NOT NULL,
            request_method TEXT NOT NULL, request_path TEXT NOT NULL,
            trace_context TEXT NOT NULL, key TEXT, state TEXT NOT NULL,
            attempt INTEGER NOT NULL, ready_at REAL NOT NULL, owner TEXT,
            recovered INTEGER NOT NULL, error_type TEXT, error_message TEXT,
            created_at REAL NOT NULL, updated_at REAL NOT NULL, finished_at REAL)""",
        # Claims scan only the unfinished rows, in the order they become ready.
        "CREATE INDEX tasks_ready ON tasks (ready_at)"
        " WHERE state IN ('queued', 'running', 'retry_wait', 'outbox')",
        "CREATE INDEX tasks_key ON tasks (key) WHERE key IS NOT NULL",
        """CREATE TABLE owners (
            owner TEXT PRIMARY KEY, pid INTEGER NOT NULL, host TEXT NOT NULL,
            heartbeat_at REAL NOT NULL)""",
    ),
    (
        # The retention purge finds finished rows by age instead of scanning the table.
        "CREATE INDEX tasks_finished ON tasks (finished_at)"
        " WHERE state IN ('succeeded', 'published')",
    ),
    (
        # How many times a process died while it ran the task: a claim of a running row
        # whose owner died counts one more, and gives up on it at MAX_INTERRUPTED.
        "ALTER TABLE tasks ADD COLUMN interrupted INTEGER NOT NULL DEFAULT 0",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)
#: The columns a migration added, by schema version, as an older file reads them: what a
#: read-only look at a store not migrated yet selects in their place.
ADDED_COLUMNS: Final[dict[int, str]] = {3: "0 AS interrupted"}

_TABLES: Final = "SELECT name FROM sqlite_master WHERE type = 'table'"


def schema_version(conn: sqlite3.Connection) -> int:
    """The file's schema version; 0 for a new file."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def check_store(conn: sqlite3.Connection, path: str) -> None:
    """Check, without writing, that the file holds an after-response store this code reads
    (an older version's is read through a temporary view that adds the columns it lacks).

    Raises:
        StoreError: the file is not an after-response store (an empty file, another
            application's database).
        SchemaVersionError: the file's version is newer than this code's.
    """
    try:
        tables = {row[0] for row in conn.execute(_TABLES)}
    except sqlite3.DatabaseError as exc:
        if "not a database" not in str(exc):  # a locked or unreadable file says so itself
            raise
        tables = set()
    version = schema_version(conn) if {"meta", "tasks", "owners"} <= tables else 0
    if not version:
        raise StoreError(
            f"{path} is not an after-response store (not a SQLite database with its "
            "tables); give the path your application's SQLiteStore uses"
        )
    _check_not_newer(version, path)
    added = [column for since, column in ADDED_COLUMNS.items() if since > version]
    if added:
        # An older file, read as it is: a view in this connection's own (in-memory) temp
        # schema, which comes first for the unqualified name, gives the queries the
        # columns it lacks. The file is not written.
        conn.execute(f"CREATE TEMP VIEW tasks AS SELECT *, {', '.join(added)} FROM main.tasks")


def _check_not_newer(version: int, path: str) -> None:
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the store {path} has schema version {version}, written by a newer "
            f"after-response; this one reads versions up to {SCHEMA_VERSION}: "
            "upgrade after-response (pip install -U after-response)"
        )


def migrate(conn: sqlite3.Connection, path: str, upto: int = SCHEMA_VERSION) -> None:
    """Bring the file to schema version ``upto`` in one transaction (outside any other).

    Raises:
        SchemaVersionError: the file's version is newer than this code's.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(conn)
        _check_not_newer(version, path)
        for number in range(version + 1, upto + 1):
            for statement in MIGRATIONS[number - 1]:
                conn.execute(statement)
        if upto > version:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(upto),),
            )
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):  # keep the original error
            conn.execute("ROLLBACK")
        raise
