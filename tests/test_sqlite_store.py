"""The SQLite store on real files: group commit, dedup, claims, crashes, failures, schema."""

from __future__ import annotations

import asyncio
import inspect
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from after_response._sqlite import SQLiteStore
from after_response._sqlite_queries import COLUMNS, encode
from after_response._sqlite_schema import MIGRATIONS, SCHEMA_VERSION, migrate
from after_response._store import SchemaVersionError, StoredTask, StoreError

from .not_stores import NOT_STORES, as_the_previous_version_left_it
from .store_child import task

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parent.parent


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "tasks.sqlite3")
    await store.open("me")
    yield store
    await store.close()


async def poll(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """``check()``'s (awaited if need be) first truthy result, asked every 20 ms for at most
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.02)


def child(*args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "tests.store_child", *args]
    pipe = subprocess.PIPE
    return subprocess.Popen(command, cwd=ROOT, stdin=pipe, stdout=pipe, text=True)


async def test_saved_task_reads_back_with_every_field(store: SQLiteStore) -> None:
    saved = task(
        "t1",
        args=["a@example.com", 42],
        kwargs={"code": "1234", "nested": {"x": [1, 2.5, None]}},
        options={"timeout": 10.0, "retry": {"attempts": 3}},
        request_method="POST",
        request_path="/login",
        trace_context={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
        key="login-1",
        owner="me",
    )
    assert await store.save([saved]) == []
    assert store.get("t1") == saved
    assert store.get("missing") is None
    assert store.count_by_state()["queued"] == 1


async def test_a_task_goes_through_running_retry_and_dead(store: SQLiteStore) -> None:
    await store.save([task("t1", owner="me"), task("t2", owner="me")])
    store.mark_running("t1", 1)
    store.mark_retry("t1", 1, 123.0, "ConnectionError", "refused [redacted]")
    store.mark_running("t2", 1)
    store.mark_succeeded("t2")
    await store.flush()
    retrying = store.get("t1")
    assert retrying is not None
    assert (retrying.state, retrying.attempt, retrying.ready_at) == ("retry_wait", 1, 123.0)
    assert (retrying.error_type, retrying.owner) == ("ConnectionError", "me")
    assert store.get("t2") is None, "a succeeded task without a key is deleted"
    store.mark_dead("t1", 2, "ConnectionError", "refused again")
    await store.flush()
    [dead] = store.dead_letters()
    assert (dead.id, dead.state, dead.attempt, dead.owner) == ("t1", "dead", 2, None)
    assert dead.finished_at is not None
    assert dead.args == task("t1").args, "a dead letter keeps its arguments"


async def test_concurrent_saves_share_one_commit(store: SQLiteStore) -> None:
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the writer waits for this lock, saves pile up
    before = store.commits
    saves = [asyncio.create_task(store.save([task(f"t{n}")])) for n in range(100)]
    await asyncio.sleep(0)  # one loop turn: every task enqueues its save
    blocker.execute("COMMIT")
    blocker.close()
    await asyncio.gather(*saves)
    assert store.commits - before <= 2
    assert store.count_by_state()["queued"] == 100


async def test_an_unfinished_or_recently_succeeded_key_is_not_stored_again(
    store: SQLiteStore,
) -> None:
    assert await store.save([task("first", key="order-42")]) == []
    assert await store.save([task("second", key="order-42")]) == ["second"]
    store.mark_succeeded("first")
    await store.flush()
    assert store.get("first") is not None, "a keyed success is kept for the dedup window"
    assert store.get("first").args == []  # type: ignore[union-attr]
    assert await store.save([task("third", key="order-42")]) == ["third"]
    assert store.get("second") is None
    assert store.get("third") is None


async def test_a_dead_task_does_not_block_its_key(store: SQLiteStore) -> None:
    await store.save([task("first", key="order-42")])
    store.mark_dead("first", 3, "ValueError", "bad")
    assert await store.save([task("second", key="order-42")]) == []
    assert store.get("second") is not None


async def test_the_same_key_twice_in_one_save_stores_the_first(store: SQLiteStore) -> None:
    batch = [task("a", key="k"), task("b", key="k"), task("c", key="other")]
    assert await store.save(batch) == ["b"]
    assert [t.id for t in sorted(store.list(), key=lambda t: t.id)] == ["a", "c"]


async def test_succeeded_keys_are_purged_after_the_retention(tmp_path: Path) -> None:
    store = SQLiteStore(
        tmp_path / "s.sqlite3", retention=0.2, heartbeat_interval=0.05, owner_timeout=1
    )
    await store.open("me")
    await store.save([task("t", key="k")])
    store.mark_succeeded("t")
    await store.flush()
    assert store.get("t") is not None
    await poll(lambda: store.get("t") is None)
    assert await store.save([task("again", key="k")]) == []
    await store.close()


async def test_released_tasks_are_claimed_by_another_owner_not_as_recovered(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.sqlite3"
    first, second = SQLiteStore(path), SQLiteStore(path)
    await first.open("first")
    await second.open("second")
    await first.save([task("run", owner="first"), task("wait", owner="first")])
    first.mark_running("run", 1)
    first.mark_retry("wait", 1, 0.0, "OSError", "x")
    assert await second.claim("second", 10) == [], "a live owner's tasks are its own"
    first.release(["run", "wait"])
    await first.flush()
    claimed = {t.id: t for t in await second.claim("second", 10)}
    assert set(claimed) == {"run", "wait"}
    assert all(t.owner == "second" and t.state == "queued" for t in claimed.values())
    assert not any(t.recovered for t in claimed.values())
    assert claimed["wait"].attempt == 1, "the attempt count survives the hand-over"
    assert (claimed["run"].attempt, claimed["run"].interrupted) == (0, 0), "cut short, not lost"
    assert await first.claim("first", 10) == []
    await first.close()
    await second.close()


async def test_a_live_owner_keeps_its_tasks_past_the_owner_timeout(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    settings: dict[str, Any] = {"heartbeat_interval": 0.05, "owner_timeout": 0.5}
    live, other = SQLiteStore(path, **settings), SQLiteStore(path, **settings)
    await live.open("live")
    await other.open("other")
    await live.save([task("mine", owner="live")])

    def heartbeat() -> float:
        with sqlite3.connect(path) as conn:
            row = conn.execute("SELECT heartbeat_at FROM owners WHERE owner = 'live'").fetchone()
        return float(row[0])

    first = heartbeat()
    await poll(lambda: heartbeat() > first + 1.5 * settings["owner_timeout"])
    assert await other.claim("other", 10) == [], "the heartbeats keep the owner alive"
    await live.close()
    await other.close()


async def test_close_commits_queued_writes_and_unregisters_the_owner(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    first, second = SQLiteStore(path), SQLiteStore(path)
    await first.open("first")
    await second.open("second")
    await first.save([task("done", owner="first"), task("left", owner="first")])
    first.mark_succeeded("done")
    await first.close()
    assert second.get("done") is None
    [taken] = await second.claim("second", 10)
    assert (taken.id, taken.recovered) == ("left", True), "its owner is gone: recovered"
    await second.close()


async def test_a_task_waiting_to_retry_is_claimed_only_once_ready(store: SQLiteStore) -> None:
    later = time.time() + 3600
    await store.save([task("later", ready_at=later), task("now")])
    assert await store.next_ready_at() is not None
    assert [t.id for t in await store.claim("me", 10)] == ["now"]
    assert await store.next_ready_at() == later
    assert await store.claim("me", 10) == []


async def test_a_killed_process_s_unfinished_tasks_are_recovered(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    process = child("crash", str(path))
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "READY"
    assert process.wait(timeout=10) == -9
    store = SQLiteStore(path, owner_timeout=0.5, heartbeat_interval=0.1)
    await store.open("parent")
    results: list[StoredTask] = await poll(lambda: store.claim("parent", 100))
    assert {t.id for t in results} == {"running-1", "running-2", "queued", "retry"}
    assert all(t.recovered and t.owner == "parent" and t.state == "queued" for t in results)
    assert store.get("done-keyed").state == "succeeded"  # type: ignore[union-attr]
    assert store.get("dead").state == "dead"  # type: ignore[union-attr]
    assert await store.claim("parent", 100) == []
    await store.close()


async def test_a_task_running_when_its_owner_died_runs_again_as_the_same_attempt(
    store: SQLiteStore,
) -> None:
    # "dead" never heartbeats: a process that died.
    await store.save(
        [
            task("ran", owner="dead", state="running", attempt=2, interrupted=1),
            task("waited", owner="dead", state="queued", attempt=1),
            task("backing-off", owner="dead", state="retry_wait", attempt=1, ready_at=0.0),
        ]
    )
    claimed = {t.id: (t.attempt, t.interrupted, t.recovered) for t in await store.claim("me", 9)}
    assert claimed == {"ran": (1, 2, True), "waited": (1, 0, True), "backing-off": (1, 0, True)}
    ran = store.get("ran")
    assert ran is not None
    assert (ran.state, ran.attempt, ran.interrupted, ran.owner) == ("queued", 1, 2, "me")


async def test_a_claim_takes_at_most_max_suspects_of_the_tasks_interrupted_twice(
    store: SQLiteStore,
) -> None:
    running = {"owner": "dead", "state": "running", "attempt": 1}
    await store.save(
        [
            *(task(f"suspect-{n}", ready_at=float(n), interrupted=1, **running) for n in range(3)),
            task("first-time", ready_at=5.0, **running),
            task("doomed", ready_at=6.0, interrupted=2, **running),
        ]
    )
    claimed = await store.claim("me", 10, max_suspects=1)
    assert [(t.id, t.interrupted) for t in claimed] == [
        ("suspect-0", 2),
        ("first-time", 1),
        ("doomed", 3),  # not run again: the claimer makes it a dead letter
    ]
    assert await store.claim("me", 10, max_suspects=0) == []
    later = await store.claim("me", 10)
    assert [(t.id, t.interrupted) for t in later] == [("suspect-1", 2), ("suspect-2", 2)]


async def test_concurrent_claims_from_processes_never_share_a_task(store: SQLiteStore) -> None:
    ids = [f"t{n:03}" for n in range(300)]
    await store.save([task(i) for i in ids])
    processes = [child("claim", store.path, f"worker-{n}") for n in range(3)]

    def tell_all(expect: str) -> None:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == expect
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("GO\n")
            process.stdin.flush()

    tell_all("READY")  # the first claims, at the same moment
    tell_all("CLAIMED")  # each has claimed once: the rest, side by side
    claims = [json.loads(p.communicate(timeout=30)[0]) for p in processes]
    assert all(claims), "each process claimed"
    everything = [i for claimed in claims for i in claimed]
    assert sorted(everything) == ids, "every task claimed exactly once"


async def test_a_save_past_the_file_size_limit_fails_whole_and_clearly(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    output, _ = child("full", str(path)).communicate(timeout=30)
    result = json.loads(output)
    assert str(path) in result["error"]
    assert "saving 64 task(s)" in result["error"]
    assert "secret-argument-value" not in result["error"]
    assert (result["big_stored"], result["small_stored"]) == (0, 2)
    store = SQLiteStore(path)
    await store.open("after")
    assert store.count_by_state()["queued"] == 2, "nothing of the failed save was stored"
    await store.close()


async def test_an_open_locked_past_the_busy_timeout_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # a new file, not yet in WAL mode: nobody may read it
        store = SQLiteStore(path, busy_timeout=0.1)
        with pytest.raises(StoreError, match=r"s\.sqlite3: opening: database is locked"):
            await store.open("me")
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    await store.open("me")  # the lock gone, it opens
    await store.close()


async def test_a_save_locked_past_the_busy_timeout_raises_store_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.sqlite3", busy_timeout=0.1)
    await store.open("me")
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match=r"s\.sqlite3: saving 1 task\(s\): database is locked"):
        await store.save([task("t", args=["secret-value"])])
    blocker.execute("ROLLBACK")
    blocker.close()
    assert store.get("t") is None
    await store.save([task("after")])
    await store.close()


async def test_a_duplicate_id_fails_its_own_save_only(store: SQLiteStore) -> None:
    await store.save([task("taken")])
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # both saves land in one batch
    bad = asyncio.create_task(store.save([task("new-1"), task("taken")]))
    good = asyncio.create_task(store.save([task("new-2")]))
    await asyncio.sleep(0)
    blocker.execute("COMMIT")
    blocker.close()
    with pytest.raises(StoreError, match="UNIQUE constraint failed"):
        await bad
    assert await good == []
    assert store.get("new-1") is None
    assert store.get("new-2") is not None


async def test_a_newer_schema_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = SQLiteStore(path)
    await store.open("me")
    await store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(SchemaVersionError, match=r"schema version 99.*upgrade after-response"):
        await store.open("me")
    with pytest.raises(SchemaVersionError, match=r"schema version 99.*upgrade after-response"):
        store.open_read_only()


async def test_a_version_1_file_is_migrated_and_keeps_its_tasks(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, str(path), upto=1)
    conn.close()
    store = SQLiteStore(path)
    await store.open("me")
    await store.save([task("t")])
    await store.close()
    assert len(MIGRATIONS) == SCHEMA_VERSION >= 2
    with sqlite3.connect(path) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert int(version[0]) == SCHEMA_VERSION
    assert "tasks_finished" in indexes


async def test_a_version_2_file_is_migrated_and_its_running_task_counted_when_claimed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, str(path), upto=2)
    old_columns = COLUMNS.removesuffix(", interrupted")
    old_row = encode(task("old", owner="dead", state="running", attempt=1))[:-1]
    placeholders = ", ".join("?" * len(old_row))
    conn.execute(f"INSERT INTO tasks ({old_columns}) VALUES ({placeholders})", old_row)
    conn.close()
    store = SQLiteStore(path)
    await store.open("me")
    assert store.get("old").interrupted == 0  # type: ignore[union-attr]
    [claimed] = await store.claim("me", 10)
    await store.close()
    assert (claimed.id, claimed.attempt, claimed.interrupted) == ("old", 0, 1)


async def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello " * 1000)
    with pytest.raises(StoreError, match=r"notes\.txt: opening: file is not a database"):
        await SQLiteStore(path).open("me")


async def test_a_store_opened_read_only_reads_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    writer = SQLiteStore(path)
    await writer.open("me")
    await writer.save([task("t")])
    writer.mark_dead("t", 3, "ValueError", "bad")
    await writer.close()
    as_the_previous_version_left_it(path)
    before = path.read_bytes()
    store = SQLiteStore(path)
    store.open_read_only()
    assert [t.id for t in store.dead_letters()] == ["t"]
    assert store.count_by_state()["dead"] == 1
    with pytest.raises(RuntimeError, match=r"open read-only: await store.open\(owner\)"):
        await store.purge_dead(all_dead=True)
    with pytest.raises(RuntimeError, match=r"open read-only: close\(\) it before open"):
        await store.open("me")
    await store.close()
    assert path.read_bytes() == before, "not migrated, no owner registered"
    await store.open("me")  # closed, it may open for writing (and migrates then)
    await store.close()
    assert path.read_bytes() != before


@pytest.mark.parametrize("make", NOT_STORES.values(), ids=NOT_STORES)
def test_a_file_that_is_not_a_store_is_refused_read_only_and_left_as_it_was(
    tmp_path: Path, make: Callable[[Path], Any]
) -> None:
    path = tmp_path / "other.sqlite3"
    make(path)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=f"{path} is not an after-response store"):
        SQLiteStore(path).open_read_only()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["other.sqlite3"]


def test_a_missing_file_is_refused_read_only_and_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sqlite3"
    with pytest.raises(StoreError, match=r"missing\.sqlite3: opening read-only: unable to open"):
        SQLiteStore(missing).open_read_only()
    assert not missing.exists()


async def test_dead_letters_are_retried_and_purged(store: SQLiteStore) -> None:
    await store.save([task(i) for i in ("a", "b", "c")])
    for i in ("a", "b", "c"):
        store.mark_dead(i, 3, "ValueError", "bad")
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE tasks SET interrupted = 3 WHERE id = 'a'")
    assert await store.retry_dead(["a", "missing"]) == 1
    retried = store.get("a")
    assert retried is not None
    assert (retried.state, retried.attempt, retried.interrupted, retried.owner) == (
        "queued",
        0,
        0,
        None,
    )
    assert await store.purge_dead(["b"]) == 1
    assert await store.purge_dead(all_dead=True) == 1
    assert store.count_by_state() == {**dict.fromkeys(store.count_by_state(), 0), "queued": 1}
    with pytest.raises(ValueError, match="either ids or all_dead=True"):
        await store.retry_dead()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"path": ":memory:"}, ValueError, "cannot live in memory"),
        ({"path": 3}, TypeError, "must be a str or a pathlib.Path"),
        ({"synchronous": "OFF"}, ValueError, '"FULL".*"NORMAL"'),
        ({"busy_timeout": 0}, ValueError, "busy_timeout=.*positive.*got 0"),
        ({"retention": "1d"}, TypeError, "retention=.*number of seconds"),
        ({"owner_timeout": 1, "heartbeat_interval": 2}, ValueError, "longer than"),
        ({"batch_max": 0}, ValueError, "batch_max=0"),
    ],
)
def test_bad_settings_are_refused_clearly(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    kwargs = {"path": "tasks.sqlite3", **kwargs}
    with pytest.raises(error, match=message):
        SQLiteStore(**kwargs)


async def test_a_store_that_is_not_open_says_so(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.sqlite3")
    with pytest.raises(RuntimeError, match=r"not open: await store.open\(owner\) first"):
        store.mark_succeeded("t")
    await store.open("me")
    await store.open("me")  # idempotent
    with pytest.raises(RuntimeError, match="already open for owner 'me'"):
        await store.open("someone else")
    await store.close()
    with pytest.raises(RuntimeError, match="is closed"):
        await store.save([task("t")])


@pytest.mark.anyio
async def test_store_calls_with_bad_arguments_say_what_was_wrong(tmp_path: Path) -> None:
    from after_response._store import StoredTask

    store = SQLiteStore(tmp_path / "bad.sqlite3")
    await store.open("owner-a")
    try:
        with pytest.raises(TypeError, match=r"claim\(owner\) expects a non-empty string"):
            await store.claim("", 1)
        with pytest.raises(ValueError, match=r"claim\(limit=0\) must be an int >= 1"):
            await store.claim("owner-a", 0)
        with pytest.raises(ValueError, match=r"claim\(states='queued'\) must be a non-empty"):
            await store.claim("owner-a", 1, states="queued")
        with pytest.raises(TypeError, match=r"retry_dead\(ids\) expects a list of ids"):
            await store.retry_dead("abc")
        with pytest.raises(ValueError, match="needs either ids or all_dead=True"):
            await store.purge_dead()
        with pytest.raises(ValueError, match=r"StoredTask\(state='lost'\) must be one of"):
            StoredTask(id="x", name="n", target="m:f", state="lost")
    finally:
        await store.close()


def test_processes_that_open_a_new_store_at_the_same_moment_all_open(tmp_path: Path) -> None:
    """A server's workers start together and open one store file: each must open it. SQLite
    can refuse a concurrent switch to WAL at once ("database is locked") rather than wait in
    the busy handler; 240 opens, 8 at a time, saw a few such refusals in every run before."""
    output, _ = child("open-race", str(tmp_path), "8", "30").communicate(timeout=120)
    result = json.loads(output)
    assert result == {"opened": 240, "errors": []}
