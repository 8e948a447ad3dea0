"""Durable side effects through the middleware, in-process under a real uvicorn: stored
before the response completes, run at once, recorded, deduplicated by key, replayed with
the same id, released at shutdown (the crash and multi-process tests are in
tests/test_durable_crash.py)."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import after_response
from after_response import (
    AfterResponseMiddleware,
    DeadLetter,
    Retry,
    SQLiteStore,
    Stats,
    TaskProcessDiedError,
)
from after_response._store import MAX_INTERRUPTED, StoredTask

from . import durable_tasks
from .durable_process import until
from .servers import serve_uvicorn, websocket_round_trip

pytestmark = pytest.mark.anyio


def ledger_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def stored(path: Path) -> SQLiteStore:
    """The store at ``path``, opened to read it (as the command line does)."""
    store = SQLiteStore(path)
    await store.open("test-reader")
    return store


def checkout_app(ledger: Path, **options: Any) -> Starlette:
    async def checkout(request: Request) -> JSONResponse:
        order = request.query_params.get("order", "42")
        request.state.after_response.options(durable=True, **options).add(
            durable_tasks.record, str(ledger), f"buyer-{order}@example.com", code=order
        )
        return JSONResponse({"order": order})

    return Starlette(routes=[Route("/checkout", checkout, methods=["POST"])])


async def dead_at_startup(
    path: Path, rows: list[StoredTask]
) -> tuple[list[StoredTask], list[DeadLetter], Stats]:
    """Store ``rows`` at ``path``, then serve a middleware on that store until the claim at
    its startup has made them all dead letters and its hook has seen them: the stored dead
    letters, the hook's, and the middleware's counts."""
    store = await stored(path)
    await store.save(rows)
    await store.close()
    letters: list[DeadLetter] = []
    middleware = AfterResponseMiddleware(
        Starlette(), store=SQLiteStore(path), on_dead_letter=letters.append
    )
    async with serve_uvicorn(middleware):
        reader = await stored(path)
        try:
            await until(lambda: len(reader.dead_letters()) == len(rows), 5, "the dead letters")
            dead = reader.dead_letters()
        finally:
            await reader.close()
        await until(lambda: len(letters) == len(rows), 5, "the hook to see them")
        stats = middleware.stats()
    return dead, letters, stats


async def serve_one_request(endpoint: Any, path: Path) -> None:
    """Serve ``GET /`` by ``endpoint`` under uvicorn, with a store at ``path``; request it
    once and wait for its side effects."""
    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]), store=SQLiteStore(path)
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)


async def test_a_durable_side_effect_is_stored_runs_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    store = SQLiteStore(tmp_path / "after_response.sqlite3")
    middleware = AfterResponseMiddleware(checkout_app(ledger), store=store)
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/checkout")
        assert response.status_code == 200
        assert await middleware.drain(timeout=5)
        stats = middleware.stats()
    assert [entry["code"] for entry in ledger_lines(ledger)] == ["42"]
    assert (stats.stored, stats.succeeded, stats.recovered) == (1, 1, 0)
    store = await stored(tmp_path / "after_response.sqlite3")
    assert not any(store.count_by_state().values())  # done, no key: nothing is kept
    await store.close()


async def test_a_key_makes_a_double_submitted_checkout_send_one_receipt(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    store = SQLiteStore(tmp_path / "after_response.sqlite3")
    middleware = AfterResponseMiddleware(checkout_app(ledger, key="order-42-receipt"), store=store)
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.post("/checkout")).status_code == 200
        assert await middleware.drain(timeout=5)
        assert (await client.post("/checkout")).status_code == 200
        assert await middleware.drain(timeout=5)
        stats = middleware.stats()
    assert len(ledger_lines(ledger)) == 1
    assert (stats.stored, stats.deduplicated, stats.succeeded) == (1, 1, 1)
    assert stats.added == stats.succeeded + stats.deduplicated


class _Mailer:
    async def send(self, to: str) -> None:
        pass


def test_durable_adds_fail_at_add_with_what_to_fix(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    errors: list[str] = []

    class LocalError(Exception):
        pass

    async def endpoint(request: Request) -> JSONResponse:
        collector = request.state.after_response
        for call in (
            lambda: collector.options(durable=True).add(lambda: None),
            lambda: collector.options(durable=True).add(
                durable_tasks.record, "l", ("a", "tuple"), code="1"
            ),
            lambda: collector.options(durable=True).add(
                durable_tasks.record, "l", "x", code=object()
            ),
            lambda: collector.options(key="k").add(durable_tasks.record, "l", "x", code="1"),
            lambda: collector.options(durable=True).add(_Mailer().send, "a@example.com"),
            lambda: collector.options(
                durable=True, retry=Retry(retry_on=(ConnectionError, LocalError))
            ).add(durable_tasks.record, "l", "x", code="1"),
        ):
            try:
                call()
            except TypeError as exc:
                errors.append(str(exc))
        return JSONResponse({})

    app = Starlette(routes=[Route("/", endpoint)])
    with TestClient(AfterResponseMiddleware(app)) as client:
        client.get("/")
        no_store = errors[:]
        errors.clear()
    with TestClient(AfterResponseMiddleware(app, store=SQLiteStore(tmp_path / "s.db"))) as client:
        client.get("/")
    assert all("store=SQLiteStore" in e for e in no_store[:3])
    assert "importable by a stable name" in errors[0]
    assert "argument 2 (a tuple) does not come back the same from JSON" in errors[1]
    assert "argument code= (an object) cannot be stored as JSON" in errors[2]
    assert "add durable=True" in errors[3]
    assert "a method bound to an object" in errors[4]
    assert "Retry(retry_on=...) holds " in errors[5]
    assert "test_durable_adds_fail_at_add_with_what_to_fix.<locals>.LocalError" in errors[5]
    assert not any("buyer" in e or "tuple')" in e for e in errors)


async def test_a_retried_durable_task_keeps_its_id_and_dead_letters_stay_in_the_store(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    path = tmp_path / "after_response.sqlite3"

    async def endpoint(request: Request) -> JSONResponse:
        request.state.after_response.options(
            durable=True, retry=Retry(attempts=2, backoff=0.01)
        ).add(durable_tasks.always_fails, str(ledger), "crm.example.com")
        return JSONResponse({})

    await serve_one_request(endpoint, path)
    store = await stored(path)
    [dead] = store.dead_letters()
    await store.close()
    assert (dead.name, dead.attempt, dead.error_type) == ("always_fails", 2, "ConnectionError")
    assert dead.error_message == "could not reach [redacted]"
    assert len(ledger_lines(ledger)) == 2


async def test_spill_writes_what_finds_no_room_to_the_store_and_runs_it_later(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.jsonl"

    async def endpoint(request: Request) -> JSONResponse:
        for order in range(20):  # not durable: spilled only because there is no room
            request.state.after_response.add(durable_tasks.record_sync, str(ledger), order)
        return JSONResponse({})

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]),
        store=SQLiteStore(tmp_path / "after_response.sqlite3"),
        max_concurrency=1,
        max_pending=1,
        overflow="spill",
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
        with anyio.fail_after(20):  # the spilled ones come back through recovery, 1 s apart
            while len(ledger_lines(ledger)) < 20:  # noqa: ASYNC110 - a bounded poll
                await anyio.sleep(0.05)
        stats = middleware.stats()
    assert sorted(entry["order"] for entry in ledger_lines(ledger)) == list(range(20))
    assert stats.shed == 0
    assert stats.released == 18  # spilled: in the store, then claimed and run
    assert stats.added == 20 + 18  # a claimed task is added again, as a recovered one would be


async def test_what_cannot_be_spilled_to_a_locked_store_is_shed_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3

    ledger = tmp_path / "ledger.jsonl"
    path = tmp_path / "after_response.sqlite3"
    release = anyio.Event()

    async def blocked() -> None:
        await release.wait()

    async def endpoint(request: Request) -> JSONResponse:
        request.state.after_response.add(blocked)
        for order in range(10):
            request.state.after_response.add(durable_tasks.record_sync, str(ledger), order)
        return JSONResponse({})

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]),
        store=SQLiteStore(path, busy_timeout=0.05),
        max_concurrency=1,
        max_pending=1,
        overflow="spill",
    )
    caplog.set_level(logging.ERROR, logger="after_response")
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        blocker = sqlite3.connect(path)  # another process's long write, say
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            await client.get("/")  # 1 runs, 1 waits, 9 find no room and cannot be spilled
            await until(lambda: middleware.stats().shed == 9, 10, "the spill to fail")
        finally:
            blocker.rollback()
            blocker.close()
        release.set()
        assert await middleware.drain(timeout=5)
    stats = middleware.stats()
    assert (stats.shed, stats.released, stats.succeeded) == (9, 0, 2)
    assert [entry["order"] for entry in ledger_lines(ledger)] == [0]
    shed = [r.getMessage() for r in caplog.records if "record_sync" in r.getMessage()]
    assert len(shed) == 2, shed  # one line in full, the others counted
    assert "and spilling it to the store failed" in shed[0]
    assert shed[1].startswith("... and 8 more tasks of ")


async def test_marks_a_locked_store_cannot_commit_are_logged_once_counted_and_summarised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Side effects end while another connection holds the store locked: their marks fail
    # (the tasks stay stored, to run again after a restart: at-least-once). One line per kind
    # of write, the others counted, and the count is written when the store closes.
    import asyncio
    import sqlite3

    ledger = tmp_path / "ledger.jsonl"
    path = tmp_path / "after_response.sqlite3"
    durable_tasks.GATES["marks"] = gate = asyncio.Event()

    async def endpoint(request: Request) -> JSONResponse:
        for _ in range(3):
            request.state.after_response.options(durable=True).add(
                durable_tasks.gated, str(ledger), "marks"
            )
        return JSONResponse({})

    store = SQLiteStore(path, busy_timeout=0.05)
    middleware = AfterResponseMiddleware(Starlette(routes=[Route("/", endpoint)]), store=store)
    caplog.set_level(logging.ERROR, logger="after_response")
    try:
        async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/")).status_code == 200  # stored: the store was free
            # Not stats().running: that counts a task before its start mark is committed,
            # and a start mark the blocker fails is a different line.
            await until(lambda: durable_tasks.ENTERED.get("marks") == 3, 10, "the three to run")
            blocker = sqlite3.connect(path)  # another process's long write, say
            blocker.execute("BEGIN EXCLUSIVE")
            try:
                gate.set()
                await until(lambda: store.failed_writes >= 3, 10, "the marks to fail")
            finally:
                blocker.rollback()
                blocker.close()
    finally:
        del durable_tasks.GATES["marks"]
        durable_tasks.ENTERED.pop("marks", None)
    assert middleware.stats().succeeded == 3
    marks = [r.getMessage() for r in caplog.records if "mark_succeeded" in r.getMessage()]
    assert len(marks) == 2, marks
    assert marks[0].startswith("could not commit a batched write: ")
    assert marks[1].startswith("... and 2 more failed writes to the durable store in the last ")
    reader = await stored(path)
    try:
        assert len(reader.list()) == 3  # still stored: they run again after a restart
    finally:
        await reader.close()


async def test_a_durable_follow_up_added_by_a_side_effect_is_stored_then_run(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.jsonl"

    async def first() -> None:
        after_response.current().options(durable=True).add(
            durable_tasks.record, str(ledger), "follow-up@example.com", code="7"
        )

    async def endpoint(request: Request) -> JSONResponse:
        request.state.after_response.add(first)
        return JSONResponse({})

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]),
        store=SQLiteStore(tmp_path / "after_response.sqlite3"),
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        assert await middleware.drain(timeout=5)
        with anyio.fail_after(5):
            while not ledger_lines(ledger):  # noqa: ASYNC110 - stored, then submitted
                await anyio.sleep(0.01)
        assert await middleware.drain(timeout=5)
        stats = middleware.stats()
    assert [entry["code"] for entry in ledger_lines(ledger)] == ["7"]
    assert (stats.stored, stats.succeeded) == (1, 2)


@pytest.mark.parametrize(
    "target",
    ["no_such_module:old_task", "tests.broken_on_import:old_task"],
    ids=["removed", "its-module-raises-on-import"],
)
async def test_stored_tasks_whose_function_is_gone_become_dead_letters_logged_once_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, target: str
) -> None:
    gone = [StoredTask(id=f"gone-{n}", name="old_task", target=target) for n in range(5)]
    caplog.set_level(logging.ERROR, logger="after_response")
    dead, letters, stats = await dead_at_startup(tmp_path / "after_response.sqlite3", gone)
    assert {(d.id, d.error_type) for d in dead} == {(t.id, "ImportError") for t in gone}
    # The hook, the counts: as for any task that failed.
    assert (stats.added, stats.failed) == (5, 5)
    assert {(letter.task_id, letter.task_name, letter.outcome) for letter in letters} == {
        (t.id, "old_task", "failed") for t in gone
    }
    assert all(isinstance(letter.exception, ImportError) for letter in letters)
    assert str(letters[0].exception) == f"{target} cannot be imported any more"
    # A removed function's tasks come back in batches: one line, the rest counted.
    lines = [r.getMessage() for r in caplog.records if "old_task" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("after-response stored task old_task (gone-")
    assert lines[1].startswith("... and 4 more tasks of old_task in the last ")
    assert lines[1].endswith(f": cannot be imported any more ({target})")


async def test_a_task_taken_over_from_the_store_keeps_its_retry_on_and_its_limits(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    path = tmp_path / "after_response.sqlite3"
    durable_tasks.GATES["hold"] = asyncio.Event()

    async def endpoint(request: Request) -> JSONResponse:
        collector = request.state.after_response
        collector.options(durable=True).add(durable_tasks.gated, str(ledger), "hold")
        for n in range(3):
            collector.options(durable=True, max_concurrency=1).add(
                durable_tasks.one_at_a_time, str(ledger), n
            )
        collector.options(
            durable=True, retry=Retry(attempts=3, backoff=0.01, retry_on=(ConnectionError,))
        ).add(durable_tasks.wrong_error, str(ledger))
        return JSONResponse({})

    # The first process runs one task at a time: the gated one holds the slot, the others
    # wait; at shutdown all four are released to the store, unrun.
    first = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]),
        store=SQLiteStore(path),
        max_concurrency=1,
        shutdown_timeout=0.1,
    )
    async with serve_uvicorn(first) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        await until(lambda: first.stats().pending == 4, 5, "four tasks wait for the slot")
    assert first.stats().released == 5
    durable_tasks.GATES["hold"].set()
    second = AfterResponseMiddleware(Starlette(), store=SQLiteStore(path))
    async with serve_uvicorn(second):
        await until(
            lambda: second.stats().succeeded + second.stats().failed == 5, 10, "all five ran"
        )
    runs = [(line["task"], line.get("at")) for line in ledger_lines(ledger)]
    # ValueError is not in retry_on: one attempt, as in the process that added it.
    assert runs.count(("wrong_error", None)) == 1
    # max_concurrency=1: each run ends before the next starts.
    limited = [at for task, at in runs if task == "one_at_a_time"]
    assert limited == ["start", "end"] * 3


async def test_a_backlog_in_the_store_is_claimed_as_fast_as_it_runs_not_a_batch_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from after_response import _recovery
    from after_response._journal import CLAIM_BATCH

    # A process that died with more stored tasks than one claim takes.
    path, ledger = tmp_path / "after_response.sqlite3", tmp_path / "ledger.jsonl"
    backlog = 2 * CLAIM_BATCH + 50
    store = await stored(path)
    await store.save(
        [
            StoredTask(
                id=f"left-{n}",
                name="record",
                target="tests.durable_tasks:record",
                args=[str(ledger), "buyer@example.com"],
                kwargs={"code": str(n)},
            )
            for n in range(backlog)
        ]
    )
    await store.close()
    # The periodic look would come after the test's timeout: only claiming again at once
    # after a full batch recovers them all in time.
    monkeypatch.setattr(_recovery, "RECOVERY_INTERVAL", 3600.0)
    middleware = AfterResponseMiddleware(Starlette(), store=SQLiteStore(path))
    async with serve_uvicorn(middleware):
        await until(lambda: middleware.stats().succeeded == backlog, 20, "the whole backlog ran")
    assert len(ledger_lines(ledger)) == backlog


async def test_a_durable_side_effect_added_in_a_websocket_is_stored_when_its_call_ends(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    closed = anyio.Event()

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        websocket.state.after_response.options(durable=True).add(
            durable_tasks.record, str(ledger), "ada@example.com", code="7"
        )
        await websocket.send_text("hi")
        await websocket.receive_text()
        await websocket.close()
        closed.set()

    middleware = AfterResponseMiddleware(
        Starlette(routes=[WebSocketRoute("/ws", chat)]),
        store=SQLiteStore(tmp_path / "after_response.sqlite3"),
    )
    async with serve_uvicorn(middleware) as url:
        stream = await anyio.connect_tcp("127.0.0.1", int(url.rsplit(":", 1)[1]))
        await websocket_round_trip(stream)
        await closed.wait()
        assert await middleware.drain(timeout=5)
    stats = middleware.stats()
    assert (stats.stored, stats.succeeded) == (1, 1)
    assert [line["code"] for line in ledger_lines(ledger)] == ["7"]


async def test_a_durable_side_effect_added_while_the_response_streams_is_stored_before_its_end(
    tmp_path: Path,
) -> None:
    from starlette.responses import StreamingResponse

    ledger = tmp_path / "ledger.jsonl"
    path = tmp_path / "after_response.sqlite3"
    seen_in_store: list[int] = []

    async def endpoint(request: Request) -> StreamingResponse:
        async def body() -> Any:
            yield b"first chunk\n"
            after_response.current().options(durable=True).add(
                durable_tasks.record, str(ledger), "stream@example.com", code="9"
            )
            yield b"last chunk\n"

        return StreamingResponse(body())

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]), store=SQLiteStore(path)
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/")
        seen_in_store.append(middleware.stats().stored)
        assert await middleware.drain(timeout=5)
    assert response.text == "first chunk\nlast chunk\n"
    assert seen_in_store == [1]  # stored before the client had the whole response
    assert [entry["code"] for entry in ledger_lines(ledger)] == ["9"]


async def test_a_store_locked_past_its_busy_timeout_turns_the_response_into_a_503(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import sqlite3

    ledger = tmp_path / "ledger.jsonl"
    path = tmp_path / "after_response.sqlite3"
    middleware = AfterResponseMiddleware(
        checkout_app(ledger), store=SQLiteStore(path, busy_timeout=0.05)
    )
    caplog.set_level(logging.ERROR, logger="after_response")
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        blocker = sqlite3.connect(path)  # another process's long write, say
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            refused = await client.post("/checkout?order=1")
        finally:
            blocker.rollback()
            blocker.close()
        accepted = await client.post("/checkout?order=2")
        assert await middleware.drain(timeout=5)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "could not be stored" in refused.text
    assert accepted.status_code == 200
    assert [entry["code"] for entry in ledger_lines(ledger)] == ["2"]  # never a 2xx unstored
    [line] = [r for r in caplog.records if "could not store 1 durable" in r.getMessage()]
    assert "buyer-1@example.com" not in line.getMessage()


async def test_late_durable_adds_the_store_refuses_fail_counted_and_are_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Durable side effects added after the response (by a task the handler started) are
    # stored first; with the store locked past its busy timeout they cannot be, so they
    # fail: counted, logged by name (one line, the rest counted), never run unstored.
    import asyncio
    import sqlite3

    ledger = tmp_path / "ledger.jsonl"
    path = tmp_path / "after_response.sqlite3"
    go, added = anyio.Event(), anyio.Event()
    later_tasks: list[asyncio.Task[None]] = []

    async def endpoint(request: Request) -> JSONResponse:
        async def later() -> None:
            await go.wait()
            for n in range(3):
                after_response.current().options(durable=True).add(
                    durable_tasks.record, str(ledger), f"late-{n}@example.com", code=str(n)
                )
            added.set()

        later_tasks.append(asyncio.get_running_loop().create_task(later()))
        return JSONResponse({})

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]), store=SQLiteStore(path, busy_timeout=0.05)
    )
    caplog.set_level(logging.ERROR, logger="after_response")
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/")).status_code == 200
        blocker = sqlite3.connect(path)  # another process's long write, say
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            go.set()
            await added.wait()
            await until(lambda: middleware.stats().failed == 3, 10, "the three to fail")
        finally:
            blocker.rollback()
            blocker.close()
        assert await middleware.drain(timeout=5)
    stats = middleware.stats()
    assert (stats.added, stats.failed, stats.stored, stats.succeeded) == (3, 3, 0, 0)
    assert ledger_lines(ledger) == []  # never run unstored
    lines = [r.getMessage() for r in caplog.records if "could not be stored" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "record" in lines[0]
    assert lines[1].startswith("... and 2 more tasks of ")
    assert "example.com" not in caplog.text


async def test_a_durable_side_effect_that_finds_no_room_waits_in_the_store_instead_of_shedding(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    release = anyio.Event()

    async def blocked() -> None:
        await release.wait()

    async def endpoint(request: Request) -> JSONResponse:
        collector = request.state.after_response
        collector.add(blocked)
        for order in range(3):
            collector.options(durable=True).add(
                durable_tasks.record, str(ledger), f"buyer-{order}@example.com", code=str(order)
            )
        return JSONResponse({})

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]),
        store=SQLiteStore(tmp_path / "after_response.sqlite3"),
        max_concurrency=1,
        max_pending=0,
        overflow_timeout=0.01,
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        with anyio.fail_after(5):
            while middleware.stats().released < 3:  # noqa: ASYNC110 - a bounded poll
                await anyio.sleep(0.01)
        release.set()
        with anyio.fail_after(10):  # claimed back from the store once there is room
            while len(ledger_lines(ledger)) < 3:  # noqa: ASYNC110 - a bounded poll
                await anyio.sleep(0.02)
        assert await middleware.drain(timeout=5)
        stats = middleware.stats()
    assert sorted(entry["code"] for entry in ledger_lines(ledger)) == ["0", "1", "2"]
    assert (stats.shed, stats.released) == (0, 3)


async def test_marks_a_closed_store_refuses_are_logged_once_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Tasks that end after the store closed (left behind at shutdown, then done): each
    # mark fails alike, so one line in full and the others counted.
    from after_response._aggregate import LogAggregator
    from after_response._durable import from_stored
    from after_response._journal import Journal
    from after_response._logs import logger
    from after_response._task import Task

    store = await stored(tmp_path / "after_response.sqlite3")
    await store.close()
    aggregator = LogAggregator(logger, 3600)
    journal = Journal(store, aggregator)
    caplog.set_level(logging.ERROR, logger="after_response")
    for n in range(5):
        row = StoredTask(
            id=f"r-{n}", name="record", target="tests.durable_tasks:record", args=["a@example.com"]
        )
        record, fn = from_stored(row)
        journal.succeeded(Task(record, fn, True, contextvars.copy_context(), n))
    aggregator.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        "after-response durable store: mark_succeeded failed (RuntimeError); the task may run "
        "again after a restart (delivery is at-least-once)"
    )
    assert lines[1].startswith("... and 4 more failures of the durable store in the last ")
    assert len(lines) == 2
    assert "example.com" not in caplog.text


async def test_a_store_that_fails_every_look_writes_one_line_and_a_count_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The store breaks under a running server (closed here; a full or failing disk alike):
    # the look for tasks to recover fails every second, written once per log_interval.
    store = SQLiteStore(tmp_path / "after_response.sqlite3")
    middleware = AfterResponseMiddleware(Starlette(), store=store, log_interval=2.5)
    caplog.set_level(logging.ERROR, logger="after_response")

    def claims() -> list[str]:
        return [r.getMessage() for r in caplog.records if "claiming failed" in r.getMessage()]

    async with serve_uvicorn(middleware):
        await store.close()
        await until(lambda: len(claims()) >= 2, 10, "a failed look, then the interval's summary")
    first, summary = claims()[:2]
    assert first.startswith("after-response durable store: claiming failed (")
    assert summary.startswith("... and ")
    assert " more failures of the durable store in the last " in summary
    assert summary.endswith("s: claiming failed (RuntimeError)")


async def test_an_attempt_is_marked_running_in_the_store_before_it_starts(
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    path = tmp_path / "after_response.sqlite3"

    async def endpoint(request: Request) -> JSONResponse:
        request.state.after_response.options(durable=True).add(
            durable_tasks.read_own_row, str(ledger), str(path)
        )
        return JSONResponse({})

    await serve_one_request(endpoint, path)
    # Were its process to die in it (at once), the next claim would count it as interrupted.
    assert [(line["state"], line["attempt"]) for line in ledger_lines(ledger)] == [("running", 1)]


async def test_stored_tasks_whose_process_died_too_often_become_dead_letters_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    # Running under "gone", a process that died: one more interruption is the last.
    crashing = [
        StoredTask(
            id=f"crashing-{n}",
            name="record",
            target="tests.durable_tasks:record",
            args=[str(ledger), "buyer@example.com"],
            kwargs={"code": str(n)},
            state="running",
            attempt=1,
            owner="gone",
            interrupted=MAX_INTERRUPTED - 1,
        )
        for n in range(5)
    ]
    caplog.set_level(logging.ERROR, logger="after_response")
    dead, letters, stats = await dead_at_startup(tmp_path / "after_response.sqlite3", crashing)
    assert not ledger_lines(ledger), "not run again"
    # The hook, the counts: as for any task that failed; the attempts that started, counted.
    assert (stats.added, stats.failed) == (5, 5)
    assert {(letter.task_id, letter.outcome, letter.attempts) for letter in letters} == {
        (t.id, "failed", MAX_INTERRUPTED) for t in crashing
    }
    assert all(isinstance(letter.exception, TaskProcessDiedError) for letter in letters)
    assert str(letters[0].exception) == (
        "record was not run again: its process died 3 times while it ran (a side effect that "
        "crashes its process?)"
    )
    assert {(d.id, d.error_type, d.attempt, d.interrupted) for d in dead} == {
        (t.id, "ProcessDied", 0, MAX_INTERRUPTED) for t in crashing
    }
    assert all(
        d.error_message == "its process died 3 times while it ran (a side effect that crashes "
        "its process?); not run again"
        for d in dead
    )
    lines = [r.getMessage() for r in caplog.records if "record" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("after-response stored task record (crashing-")
    assert lines[0].endswith(
        "cannot run: its process died 3 times while it ran (a side effect that crashes its "
        "process?); it is a dead letter now"
    )
    assert lines[1].startswith("... and 4 more tasks of record in the last ")
    assert lines[1].endswith(": its process died 3 times while it ran")
    assert "buyer@example.com" not in caplog.text
