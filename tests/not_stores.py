"""Files that are not after-response stores (and stores of an older version), for the tests
that check nothing writes to them."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any


def another_app_s_database(path: Path) -> None:
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
        conn.execute("INSERT INTO users (email) VALUES ('ada@example.com')")


def a_database_with_a_tasks_table_of_its_own(path: Path) -> None:
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY, title TEXT)")


NOT_STORES: dict[str, Callable[[Path], Any]] = {
    "another app's database": another_app_s_database,
    "a database with a tasks table": a_database_with_a_tasks_table_of_its_own,
    "an empty file": lambda path: path.write_bytes(b""),
    "a text file": lambda path: path.write_text("not a database\n" * 100),
}


def as_the_previous_version_left_it(path: Path) -> None:
    """Turn the store at ``path`` back into what the previous schema version wrote: undo the
    last migration (schema 3 added the ``interrupted`` column) and say version 2. Update it
    with each new migration."""
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("ALTER TABLE tasks DROP COLUMN interrupted")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
