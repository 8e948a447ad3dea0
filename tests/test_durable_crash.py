"""Durable side effects survive what real servers go through: ``kill -9`` under load, a
worker of four killed, a full disk, a SIGTERM with work queued, and the command line after
it all. Every server is a real uvicorn process of :mod:`tests.durable_app`; the side effects
count their own runs in a ledger (:mod:`tests.durable_ledger`), by order and task id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from after_response import SQLiteStore
from after_response._store import MAX_INTERRUPTED

from . import durable_ledger
from .durable_process import ROOT, Load, ServerProcess, running, unfinished, until, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.server]

#: The store's owner_timeout in tests.durable_app: a process silent this long is dead.
OWNER_TIMEOUT = 1.0


class Files:
    """One test's store, ledger and spans files, and the environment naming them."""

    def __init__(self, tmp_path: Path) -> None:
        self.db = tmp_path / "after_response.sqlite3"
        self.ledger = tmp_path / "ledger.jsonl"
        self.spans = tmp_path / "spans.jsonl"

    def env(self, **extra: str) -> dict[str, str]:
        return {"AR_TEST_DB": str(self.db), "AR_TEST_LEDGER": str(self.ledger), **extra}

    def runs(self) -> list[dict[str, Any]]:
        return durable_ledger.read(self.ledger)

    def orders_run(self) -> set[int]:
        return {run["order"] for run in self.runs()}


def runs_by_order(runs: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    by_order: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_order[run["order"]].append(run)
    return by_order


def assert_one_id_per_order(runs: list[dict[str, Any]]) -> None:
    """A task keeps its id across a replay, and no two orders share one."""
    orders_of_id: dict[str, set[int]] = defaultdict(set)
    ids_of_order: dict[int, set[str]] = defaultdict(set)
    for run in runs:
        orders_of_id[run["id"]].add(run["order"])
        ids_of_order[run["order"]].add(run["id"])
    assert all(len(orders) == 1 for orders in orders_of_id.values())
    assert all(len(ids) == 1 for ids in ids_of_order.values())


async def test_kill_9_under_load_then_restart_runs_every_side_effect_of_every_2xx(
    tmp_path: Path,
) -> None:
    files = Files(tmp_path)
    load = Load()
    with ExitStack() as servers:
        first = servers.enter_context(running(files.env()))
        first.wait_ready()
        async with anyio.create_task_group() as clients:
            for _ in range(64):
                clients.start_soon(load.client, first.url)

            def mid_load() -> bool:
                ran = files.orders_run()
                return len(ran) >= 100 and len(set(load.completed) - ran) >= 5

            await until(mid_load, 20, "100 side effects ran, 5 more are promised by a 2xx")
            first.kill()  # the clients end on their next request: refused
        ran_before_kill = files.orders_run()
        in_flight = {row.id: row.args[1] for row in (await unfinished(files.db)).values()}
        # Stored before the response started: a 2xx's task either ran or is in the store.
        assert set(load.completed) <= ran_before_kill | set(in_flight.values())
        assert in_flight, "the kill happened under load, with side effects in flight"

        second = servers.enter_context(running(files.env()))
        restarted = time.time()
        second.wait_ready()

        def replayed_all() -> bool:
            runs = files.runs()
            ran_again = {run["id"] for run in runs if run["pid"] == second.pid}
            return set(in_flight) <= ran_again and set(load.completed) <= files.orders_run()

        await until(replayed_all, 20, "every task in flight at the kill ran again")
        second.terminate()
        assert await unfinished(files.db) == {}, "every run is recorded in the store"

    runs = files.runs()
    assert set(load.completed) <= {run["order"] for run in runs}, "no 2xx side effect lost"
    replayed = [run for run in runs if run["pid"] == second.pid]
    assert {run["id"] for run in replayed} == set(in_flight), "each in-flight task ran again"
    assert all(run["recovered"] for run in replayed)
    assert not any(run["recovered"] for run in runs if run["pid"] == first.pid)
    assert_one_id_per_order(runs)
    by_order = runs_by_order(runs)
    duplicated = {order for order, of_order in by_order.items() if len(of_order) > 1}
    assert duplicated <= set(in_flight.values()) & ran_before_kill
    assert all(len(of_order) <= 2 for of_order in by_order.values())
    first_recovered = min(run["at"] for run in replayed)
    print(
        f"\n{len(load.completed)} complete 2xx, {len(load.failed)} requests failed (cut or "
        "refused) after the kill; "
        f"{len(in_flight)} tasks in flight at the kill (running + queued), "
        f"{len(set(load.completed) - ran_before_kill)} of them promised by a 2xx; "
        f"{len(duplicated)} ran twice; first recovered run {first_recovered - restarted:.2f}s "
        "after the restart"
    )
    assert "@example.com" not in first.output + second.output


async def test_three_of_four_workers_take_over_the_unfinished_work_of_one_killed(
    tmp_path: Path,
) -> None:
    files = Files(tmp_path)
    load = Load()
    with ExitStack() as stack:
        # Side effects of 0.5 s: each process has some in flight whenever it is killed.
        env = files.env(AR_TEST_TASK_SECONDS="0.5")
        servers = [stack.enter_context(running(env)) for _ in range(4)]
        for server in servers:
            server.wait_ready()
        victim, survivors = servers[0], servers[1:]

        def victim_ran(runs: int) -> bool:
            return [run["pid"] for run in files.runs()].count(victim.pid) >= runs

        async with anyio.create_task_group() as clients:
            for server in servers:
                for _ in range(8):
                    clients.start_soon(load.client, server.url)
            await until(lambda: victim_ran(20), 20, "the victim ran 20 side effects")
            victim.kill()
            killed = time.monotonic()
            ran_before_kill = files.orders_run()
            load.stop.set()
        rows = await unfinished(files.db)
        victims = {
            row.id: row.args[1] for row in rows.values() if f":{victim.pid}:" in (row.owner or "")
        }
        assert victims, "the victim had side effects in flight"

        def taken_over() -> bool:
            runs = files.runs()
            recovered = {run["id"] for run in runs if run["recovered"]}
            return set(victims) <= recovered and set(load.completed) <= files.orders_run()

        await until(taken_over, OWNER_TIMEOUT + 5, "the survivors ran every task the victim left")
        took_over = time.monotonic() - killed
        for server in survivors:
            server.terminate()
        assert await unfinished(files.db) == {}, "every run is recorded in the store"

    runs = files.runs()
    assert set(load.completed) <= {run["order"] for run in runs}, "no 2xx side effect lost"
    recovered = [run for run in runs if run["recovered"]]
    assert {run["id"] for run in recovered} == set(victims), "only the victim's, all of them"
    assert {run["pid"] for run in recovered} <= {server.pid for server in survivors}
    assert_one_id_per_order(runs)
    for order, of_order in runs_by_order(runs).items():
        if len(of_order) > 1:
            first, again = of_order
            assert (first["pid"], again["recovered"]) == (victim.pid, True), order
            assert order in ran_before_kill
    print(
        f"\n{len(load.completed)} complete 2xx over 4 workers; the killed one had "
        f"{len(victims)} unfinished, taken over within {took_over:.2f}s of its death"
    )


async def test_a_full_store_answers_503_and_never_a_2xx_for_an_unstored_side_effect(
    tmp_path: Path,
) -> None:
    files = Files(tmp_path)
    responses: dict[int, httpx.Response] = {}
    # Below SQLite's WAL auto-checkpoint (1,000 pages): once the WAL reaches the limit, it
    # stays there, like a disk that stays full.
    with running(files.env(), file_size_limit=256 * 1024) as server:
        server.wait_ready()
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            for order in range(1, 2001):
                responses[order] = await client.post(f"/checkout?order={order}")
                if responses[order].status_code == 503:
                    break
            full_at = order
            for order in range(full_at + 1, full_at + 21):
                responses[order] = await client.post(f"/checkout?order={order}")
        completed = {order for order, response in responses.items() if response.is_success}
        await until(lambda: completed <= files.orders_run(), 10, "every 2xx's side effect ran")
        output = server.output
    print(f"\nthe store filled up after {len(completed)} stored checkouts")
    assert completed == set(range(1, full_at)), "2xx until the store was full"
    after = [responses[order] for order in range(full_at, full_at + 21)]
    assert [response.status_code for response in after] == [503] * 21
    assert all(response.headers["retry-after"] == "1" for response in after)
    assert (
        "ERROR after_response: after-response could not store 1 durable side effect(s) of "
        "POST /checkout, so the response is a 503" in output
    )
    assert files.orders_run() <= completed | set(range(full_at, full_at + 21))
    assert "@example.com" not in output


async def test_sigterm_releases_unfinished_side_effects_to_the_next_process(
    tmp_path: Path,
) -> None:
    files = Files(tmp_path)
    slow = files.env(
        AR_TEST_TASK_SECONDS="3600", AR_TEST_MAX_CONCURRENCY="2", AR_TEST_SHUTDOWN_TIMEOUT="0.5"
    )
    with running(slow) as first:
        first.wait_ready()
        async with httpx.AsyncClient(base_url=first.url, timeout=10.0) as client:
            for order in range(1, 7):
                assert (await client.post(f"/checkout?order={order}")).is_success
        await until(
            lambda: (first.stats()["running"], first.stats()["pending"]) == (2, 4),
            5,
            "two side effects run and four wait",
        )
        first.terminate()
    assert "released to the store" in first.output
    assert "@example.com" not in first.output
    assert len(await unfinished(files.db)) == 6
    assert files.runs() == []

    with running(files.env()) as second:
        second.wait_ready()
        await until(lambda: len(files.runs()) == 6, 10, "the next process ran all six")
        second.terminate()
    runs = files.runs()
    assert sorted(run["order"] for run in runs) == [1, 2, 3, 4, 5, 6]
    assert {run["pid"] for run in runs} == {second.pid}
    assert not any(run["recovered"] for run in runs), "released, not recovered from the dead"
    assert await unfinished(files.db) == {}


def wait_killed(server: ServerProcess, what: str) -> None:
    """Wait until ``server`` has died of a SIGKILL (its own side effect's)."""
    wait_until(lambda: server.process.poll() is not None, 20, f"{what}:\n{server.output}")
    assert server.process.returncode == -signal.SIGKILL, server.output


async def test_a_side_effect_that_kills_its_process_is_a_dead_letter_after_three_deaths(
    tmp_path: Path,
) -> None:
    files = Files(tmp_path)
    innocent = {2, 3, 4}
    with ExitStack() as servers:
        first = servers.enter_context(running(files.env()))
        first.wait_ready()
        async with httpx.AsyncClient(base_url=first.url, timeout=10.0) as client:
            assert (await client.post("/crash?order=1&innocent=3")).is_success
        wait_killed(first, "the crashing side effect killed the server that ran it")
        died = [first]
        # Each restart takes the dead process's tasks over (once its heartbeat is stale),
        # and dies with them: the crash loop, bounded.
        for restart in range(1, MAX_INTERRUPTED):
            server = servers.enter_context(running(files.env()))
            wait_killed(server, f"restart {restart} ran the crashing side effect and died")
            died.append(server)
        last = servers.enter_context(running(files.env()))
        last.wait_ready()
        reader = SQLiteStore(files.db)

        def settled() -> bool:
            assert last.process.poll() is None, f"the last process died:\n{last.output}"
            return bool(reader.dead_letters()) and innocent <= files.orders_run()

        await reader.open(f"test-reader-{os.getpid()}")
        try:
            await until(settled, 20, "a dead letter, and every innocent side effect ran")
            dead = reader.dead_letters()
        finally:
            await reader.close()
        table = cli("list", "--db", str(files.db))
        last.terminate()

    runs = files.runs()
    crashed = [run for run in runs if run["order"] == 1]
    assert [run["pid"] for run in crashed] == [server.pid for server in died]
    assert all(run["attempt"] == 1 for run in crashed), "a death does not count as an attempt"
    assert sorted(run["order"] for run in runs if run["order"] != 1) == sorted(innocent)
    [letter] = dead
    assert (letter.name, letter.error_type, letter.interrupted, letter.attempt) == (
        "crash",
        "ProcessDied",
        MAX_INTERRUPTED,
        0,
    )
    assert letter.error_message == (
        f"its process died {MAX_INTERRUPTED} times while it ran (a side effect that crashes "
        "its process?); not run again"
    )
    assert letter.id == crashed[0]["id"]
    assert (
        f"ERROR after_response: after-response stored task crash ({letter.id}) cannot run: its "
        f"process died {MAX_INTERRUPTED} times while it ran (a side effect that crashes its "
        "process?); it is a dead letter now" in last.output
    )
    assert table.stdout.splitlines()[1].split()[:4] == [letter.id, "crash", "0", "ProcessDied"]
    assert await unfinished(files.db) == {}
    assert "@example.com" not in "".join(server.output for server in [*died, last])


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m after_response dead-letters ARGS`` in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "after_response", "dead-letters", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_the_command_line_lists_a_served_dead_letter_and_runs_it_again(
    tmp_path: Path,
) -> None:
    files = Files(tmp_path)
    db = str(files.db)
    with running(files.env()) as server:
        server.wait_ready()
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            assert (await client.post("/charge?order=7")).is_success
        await until(lambda: server.stats()["failed"] == 1, 10, "both attempts failed")
        await until(lambda: "charge" in cli("list", "--db", db).stdout, 10, "a dead letter")
        table = cli("list", "--db", db)
        [record] = json.loads(cli("list", "--json", "--db", db).stdout)
        show = cli("show", record["id"], "--db", db)
        rerun = cli("retry", record["id"], "--run", "--db", db, AR_TEST_DOWNSTREAM_UP="1")
        after = cli("list", "--db", db)
        server.terminate()

    header, row = table.stdout.splitlines()
    assert header.split()[:4] == ["ID", "NAME", "ATTEMPTS", "ERROR"]
    assert row.split()[:4] == [record["id"], "charge", "2", "ConnectionError"]
    assert (record["attempt"], record["arguments"]) == (
        2,
        {"positional": 2, "keyword_names": ["card_holder"]},
    )
    assert "state:       dead (dead letter)" in show.stdout
    assert (rerun.returncode, rerun.stdout.strip()) == (
        0,
        f"{record['id']}  charge  succeeded after 1 attempt(s)",
    ), rerun.stderr
    assert after.stdout.strip() == f"no dead letters in {db}"
    runs = files.runs()
    assert [(run["succeeded"], run["attempt"]) for run in runs] == [
        (False, 1),
        (False, 2),
        (True, 1),
    ]
    assert {run["id"] for run in runs} == {record["id"]}, "one id, in the server and the CLI"
    assert runs[-1]["pid"] != server.pid
    everything = table.stdout + show.stdout + rerun.stdout + rerun.stderr + server.output
    assert "holder-7@example.com" not in everything, "no argument value in any output"


@pytest.fixture(scope="module")
def spans_across_a_crash(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A checkout whose side effect was running when its process was killed, and replayed
    by the next one: the ledger's run, the request's server span, the replayed run's span."""
    files = Files(tmp_path_factory.mktemp("trace"))
    traced = files.env(AR_TEST_SPANS=str(files.spans))
    with running({**traced, "AR_TEST_TASK_SECONDS": "3600"}) as first:
        first.wait_ready()
        assert httpx.post(f"{first.url}/checkout?order=1", timeout=10.0).is_success
        wait_until(lambda: first.stats()["running"] == 1, 5, "the side effect runs")
        first.kill()
    with running(traced) as second:
        second.wait_ready()
        wait_until(files.runs, 10, "the side effect ran again")
        second.terminate()
    [run] = files.runs()
    spans = durable_ledger.read(files.spans)
    [request] = [span for span in spans if span["name"] == "POST /checkout"]
    [replayed] = [span for span in spans if span["name"] == "after_response ship"]
    assert (request["pid"], replayed["pid"], run["pid"]) == (first.pid, second.pid, second.pid)
    return run, request, replayed


def test_a_replayed_side_effect_continues_its_request_s_trace(
    spans_across_a_crash: tuple[dict[str, Any], dict[str, Any], dict[str, Any]],
) -> None:
    run, request, replayed = spans_across_a_crash
    assert run["recovered"]
    assert request["kind"] == "SERVER"
    assert (replayed["trace_id"], replayed["parent_span_id"]) == (
        request["trace_id"],
        request["span_id"],
    )
    assert replayed["attributes"]["after_response.task.id"] == run["id"]


def test_a_replayed_side_effect_s_span_says_it_was_recovered(
    spans_across_a_crash: tuple[dict[str, Any], dict[str, Any], dict[str, Any]],
) -> None:
    _, _, replayed = spans_across_a_crash
    assert replayed["attributes"].get("after_response.task.recovered") is True
