"""``python -m after_response dead-letters ...`` end to end, in its own process, on a real file."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from after_response._sqlite import SQLiteStore
from after_response._store import StoredTask

from .not_stores import NOT_STORES, as_the_previous_version_left_it

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parent.parent
SECRET = "alice@example.com"
CODE = "code-8f3a-secret"


PYTHON_M = (sys.executable, "-m", "after_response")
CONSOLE_SCRIPT = (str(Path(sys.executable).parent / "after-response"),)


def cli(
    *args: str, program: Sequence[str] = PYTHON_M, cwd: Path = ROOT, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*program, "dead-letters", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def dead(id: str, target: str, args: list[Any], **fields: Any) -> StoredTask:
    return StoredTask(id=id, name=target.rpartition(":")[2], target=target, args=args, **fields)


async def seed(path: Path, *tasks: StoredTask, alive: StoredTask | None = None) -> None:
    """Store ``tasks`` as dead letters after 3 failed attempts (and ``alive`` as queued)."""
    store = SQLiteStore(path)
    await store.open("seed")
    await store.save([*tasks, *([alive] if alive else [])])
    for task in tasks:
        store.mark_dead(task.id, 3, "ConnectionError", "could not reach [redacted]")
    await store.close()


async def read(path: Path, id: str) -> StoredTask | None:
    store = SQLiteStore(path)
    await store.open("reader")
    task = store.get(id)
    await store.close()
    return task


@pytest.fixture
async def db(tmp_path: Path) -> Path:
    """A store with two dead letters (one with a secret argument) and one queued task."""
    path = tmp_path / "app.sqlite3"
    ledger = str(tmp_path / "ledger.jsonl")
    await seed(
        path,
        dead("receipt-1", "tests.durable_tasks:record", [ledger, SECRET], kwargs={"code": CODE}),
        dead("sync-2", "tests.durable_tasks:record_sync", [ledger, 42]),
        alive=dead("queued-3", "tests.durable_tasks:record_sync", [ledger, 7]),
    )
    return path


def ledger(db: Path) -> list[dict[str, Any]]:
    path = db.parent / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_list_prints_an_aligned_table_of_dead_letters(db: Path) -> None:
    result = cli("list", "--db", str(db))
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "ATTEMPTS", "ERROR", "MESSAGE", "DEAD", "AT"]
    assert sorted(row.split()[0] for row in rows) == ["receipt-1", "sync-2"]
    for row in rows:
        assert row.index("ConnectionError") == header.index("ERROR")
        assert " 3 " in row
        assert "UTC" in row
    assert SECRET not in result.stdout
    assert CODE not in result.stdout


async def test_list_json_names_the_arguments_without_their_values(db: Path) -> None:
    result = cli("list", "--json", "--db", str(db))
    assert result.returncode == 0, result.stderr
    records = {record["id"]: record for record in json.loads(result.stdout)}
    assert set(records) == {"receipt-1", "sync-2"}
    receipt = records["receipt-1"]
    assert receipt["arguments"] == {"positional": 2, "keyword_names": ["code"]}
    assert (receipt["state"], receipt["attempt"], receipt["error_type"]) == (
        "dead",
        3,
        "ConnectionError",
    )
    assert SECRET not in result.stdout
    assert CODE not in result.stdout


@pytest.mark.parametrize("as_json", [False, True])
async def test_show_prints_the_record_but_never_the_argument_values(
    db: Path, as_json: bool
) -> None:
    result = cli("show", "receipt-1", "--db", str(db), *(["--json"] if as_json else []))
    assert result.returncode == 0, result.stderr
    assert "tests.durable_tasks:record" in result.stdout
    assert SECRET not in result.stdout
    assert CODE not in result.stdout
    if not as_json:
        assert "arguments:   2 positional, keyword names: code (values not shown)" in result.stdout
        assert "state:       dead (dead letter)" in result.stdout


async def test_retry_makes_one_dead_letter_ready_for_a_live_process(db: Path) -> None:
    result = cli("retry", "receipt-1", "--db", str(db))
    assert (result.returncode, result.stdout.strip()) == (
        0,
        "1 dead letter queued again for a live process of the app",
    )
    retried = await read(db, "receipt-1")
    assert retried is not None
    assert (retried.state, retried.owner, retried.attempt) == ("queued", None, 0)
    assert (await read(db, "sync-2")).state == "dead"  # type: ignore[union-attr]
    assert ledger(db) == [], "retry without --run runs nothing itself"


async def test_retry_all_and_purge_take_every_dead_letter(db: Path) -> None:
    assert cli("retry", "--all", "--db", str(db)).stdout.startswith("2 dead letters")
    assert cli("purge", "--all", "--db", str(db)).returncode == 1, "none are dead any more"
    await seed(db, dead("again", "tests.durable_tasks:record_sync", []))
    purged = cli("purge", "again", "--db", str(db))
    assert (purged.returncode, purged.stdout.strip()) == (0, "1 dead letter purged")
    assert await read(db, "again") is None
    assert await read(db, "receipt-1") is not None


async def test_retry_run_runs_the_task_with_its_stored_arguments(db: Path) -> None:
    result = cli("retry", "receipt-1", "--run", "--db", str(db))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "receipt-1  record  succeeded after 1 attempt(s)"
    [entry] = ledger(db)
    assert entry["task"] == "record"
    assert (entry["to"], entry["code"]) == (SECRET, CODE)
    assert entry["pid"] != os.getpid()
    assert await read(db, "receipt-1") is None, "succeeded without a key: deleted"


async def test_retry_run_all_honours_targets_timeouts_and_retries(tmp_path: Path) -> None:
    db, ledger_path = tmp_path / "app.sqlite3", str(tmp_path / "ledger.jsonl")
    no_backoff = {"attempts": 2, "backoff": 0, "jitter": 0}
    await seed(
        db,
        dead("nested", "tests.durable_tasks:Receipts.send", [ledger_path, {"id": 7}]),
        dead("sync", "tests.durable_tasks:record_sync", [ledger_path, 42]),
        dead("hangs", "tests.durable_tasks:hangs", [ledger_path], options={"timeout": 0.2}),
        dead(
            "fails",
            "tests.durable_tasks:always_fails",
            [ledger_path, SECRET],
            options={"retry": no_backoff},
        ),
        dead("gone", "tests.durable_tasks:no_such_function", []),
    )
    gone = await read(db, "gone")
    result = cli("retry", "--all", "--run", "--db", str(db))
    assert result.returncode == 1, "some ended dead again"
    lines = dict(line.split("  ", 1) for line in result.stdout.splitlines())
    assert lines == {
        "nested": "Receipts.send  succeeded after 1 attempt(s)",
        "sync": "record_sync  succeeded after 1 attempt(s)",
        "hangs": "hangs  dead again (TaskTimeoutError) after 1 attempt(s)",
        "fails": "always_fails  dead again (ConnectionError) after 2 attempt(s)",
    }
    assert "not run: gone (no_such_function): tests.durable_tasks:no_such_function" in (
        result.stderr
    )
    assert "was it renamed or removed?" in result.stderr
    assert await read(db, "gone") == gone
    ran = [entry["task"] for entry in ledger(tmp_path / "app.sqlite3")]
    assert sorted(ran) == ["Receipts.send", "always_fails", "always_fails", "hangs", "record_sync"]
    failed = await read(db, "fails")
    assert failed is not None
    assert (failed.state, failed.attempt, failed.owner) == ("dead", 2, None)
    assert failed.error_message == "could not reach [redacted]"
    assert SECRET not in result.stdout + result.stderr
    hung = await read(db, "hangs")
    assert hung is not None
    # Stored as a web process stores a timeout: the qualified type, not the bare name.
    assert hung.error_type == "after_response._errors.TaskTimeoutError"


async def test_retry_run_keeps_the_arguments_out_of_the_stored_error_and_the_output(
    tmp_path: Path,
) -> None:
    db, ledger_path = tmp_path / "app.sqlite3", str(tmp_path / "ledger.jsonl")
    token, address, item, note = (
        "SECRET\\TOKEN-123\n",
        "ada.secret@example.com",
        "SECRET\\TOKEN-456",
        "hunter2-note",
    )
    no_backoff = {"attempts": 2, "backoff": 0, "jitter": 0}
    await seed(
        db,
        dead(
            "quotes",
            "tests.durable_tasks:quotes_its_arguments",
            [ledger_path, token, {address: 1}, ["plain-item", item]],
            kwargs={"note": note},
            options={"retry": no_backoff},
        ),
    )
    ran = cli("retry", "--all", "--run", "--db", str(db))
    assert ran.stdout.strip() == (
        "quotes  quotes_its_arguments  dead again (ValueError) after 2 attempt(s)"
    )
    with sqlite3.connect(db) as conn:
        [(stored,)] = conn.execute("SELECT error_message FROM tasks").fetchall()
    assert stored.startswith("bad token [redacted] ('[redacted]'); bad mapping ['[redacted]']")
    outputs = [
        ran.stdout + ran.stderr,
        stored,
        *(
            cli(*command, "--db", str(db)).stdout
            for command in (
                ("list",),
                ("list", "--json"),
                ("show", "quotes"),
                ("show", "quotes", "--json"),
            )
        ),
    ]
    for value in (token, address, item, "plain-item", note):
        for form in (value, repr(value)[1:-1], json.dumps(value)[1:-1]):
            assert not any(form in output for output in outputs), form


APP_TASKS = """
import json


def send(ledger, to):
    with open(ledger, "a") as file:
        file.write(json.dumps({"task": "send", "to": to}) + "\\n")
"""


@pytest.mark.parametrize("program", [CONSOLE_SCRIPT, PYTHON_M], ids=["console-script", "-m"])
async def test_retry_run_imports_the_app_s_modules_from_the_working_directory(
    tmp_path: Path, program: Sequence[str]
) -> None:
    (tmp_path / "app_tasks.py").write_text(APP_TASKS)
    db = tmp_path / "app.sqlite3"
    await seed(db, dead("receipt-1", "app_tasks:send", [str(tmp_path / "ledger.jsonl"), SECRET]))
    result = cli("retry", "--all", "--run", "--db", str(db), program=program, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.strip() == "receipt-1  send  succeeded after 1 attempt(s)"
    assert [entry["to"] for entry in ledger(db)] == [SECRET]


@pytest.mark.parametrize("which", [("receipt-1",), ("--all",)])
async def test_retry_run_leaves_a_dead_letter_whose_module_does_not_import_as_it_was(
    tmp_path: Path, which: tuple[str, ...]
) -> None:
    db = tmp_path / "app.sqlite3"
    await seed(db, dead("receipt-1", "app_tasks:send", [str(tmp_path / "ledger.jsonl"), SECRET]))
    before = await read(db, "receipt-1")
    result = cli("retry", *which, "--run", "--db", str(db), program=CONSOLE_SCRIPT, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (1, "")
    assert "not run: receipt-1 (send): app_tasks:send cannot be imported here" in result.stderr
    assert "No module named 'app_tasks'" in result.stderr
    assert "run the command from your app's directory" in result.stderr
    assert "PYTHONPATH" in result.stderr
    assert SECRET not in result.stderr
    assert await read(db, "receipt-1") == before, "its error and attempts are kept"


async def test_the_console_script_and_the_environment_variable(db: Path) -> None:
    result = cli("list", program=CONSOLE_SCRIPT, AFTER_RESPONSE_DB=str(db))
    assert result.returncode == 0, result.stderr
    assert "receipt-1" in result.stdout


@pytest.mark.parametrize("command", [("list",), ("retry", "--all"), ("purge", "--all")])
async def test_a_missing_file_is_an_error_and_is_not_created(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    missing = tmp_path / "typo.sqlite3"
    result = cli(*command, "--db", str(missing))
    assert result.returncode == 1
    assert f"no store at {missing} (the file does not exist)" in result.stderr
    assert not missing.exists()


@pytest.mark.parametrize("make", NOT_STORES.values(), ids=NOT_STORES)
@pytest.mark.parametrize(
    "command",
    [("list",), ("show", "x"), ("retry", "x"), ("retry", "--all", "--run"), ("purge", "--all")],
    ids=" ".join,
)
def test_a_file_that_is_not_a_store_is_refused_and_left_as_it_was(
    tmp_path: Path, make: Callable[[Path], Any], command: tuple[str, ...]
) -> None:
    path = tmp_path / "other.sqlite3"
    make(path)
    before = path.read_bytes()
    result = cli(*command, "--db", str(path))
    assert result.returncode == 1
    assert f"after-response: {path} is not an after-response store" in result.stderr
    assert "give the path your application's SQLiteStore uses" in result.stderr
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["other.sqlite3"]


@pytest.mark.parametrize(
    "command", [("list",), ("list", "--json"), ("show", "receipt-1")], ids=" ".join
)
async def test_reading_commands_write_nothing_to_the_store(
    db: Path, command: tuple[str, ...]
) -> None:
    as_the_previous_version_left_it(db)
    before = await anyio.Path(db).read_bytes()
    result = cli(*command, "--db", str(db))
    assert result.returncode == 0, result.stderr
    assert "receipt-1" in result.stdout
    assert await anyio.Path(db).read_bytes() == before, "not migrated, no owner registered"


@pytest.mark.parametrize(
    "args",
    [("show", "nope"), ("retry", "nope"), ("retry", "nope", "--run"), ("purge", "nope")],
)
async def test_an_unknown_id_is_an_error(db: Path, args: tuple[str, ...]) -> None:
    result = cli(*args, "--db", str(db))
    assert result.returncode == 1
    assert "nope" in result.stderr


async def test_a_queued_task_is_not_a_dead_letter_to_retry(db: Path) -> None:
    result = cli("retry", "queued-3", "--db", str(db))
    assert result.returncode == 1
    assert "no dead letter with id queued-3" in result.stderr


async def test_a_newer_schema_is_an_error_naming_the_fix(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    result = cli("list", "--db", str(db))
    assert result.returncode == 1
    assert "schema version 99" in result.stderr
    assert "upgrade after-response" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("list",), "--db PATH or $AFTER_RESPONSE_DB"),
        (("retry", "--db", "x.sqlite3"), "either an ID or --all"),
        (("purge", "a", "--all", "--db", "x.sqlite3"), "either an ID or --all"),
        (("explode", "--db", "x.sqlite3"), "invalid choice"),
    ],
)
def test_usage_mistakes_exit_with_2(args: tuple[str, ...], message: str) -> None:
    result = cli(*args, AFTER_RESPONSE_DB="")
    assert result.returncode == 2
    assert message in result.stderr
