"""Durable side effects survive what real servers go through: ``kill -9`` under load, a
worker of four killed, a full disk, a SIGTERM with work queued, and the command line after
it all. Every server is a real uvicorn process of :mod:`tests.durable_app`; the side effects
count their own runs in a ledger (:mod:`tests.durable_ledger`), by order and task id."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest

from . import durable_ledger
from .durable_process import Load, running, unfinished, until

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
            for _ in range(32):
                clients.start_soon(load.client, first.url)
            await until(lambda: len(files.runs()) >= 200, 20, "200 side effects ran")
            first.kill()  # the clients end on their next request: refused
        ran_before_kill = files.orders_run()
        in_flight = {row.id: row.args[1] for row in (await unfinished(files.db)).values()}
        # Stored before the response started: a 2xx's task either ran or is in the store.
        assert set(load.completed) <= ran_before_kill | set(in_flight.values())
        assert in_flight, "the kill happened under load, with side effects in flight"

        second = servers.enter_context(running(files.env()))
        restarted = time.time()
        second.wait_ready()
        expected = set(load.completed) | set(in_flight.values())
        await until(lambda: expected <= files.orders_run(), 20, "every stored task ran")
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
        f"\n{len(load.completed)} complete 2xx, {len(load.failed)} requests cut by the kill; "
        f"{len(in_flight)} tasks in flight at the kill (running + queued), "
        f"{len(set(load.completed) - ran_before_kill)} of them promised by a 2xx; "
        f"{len(duplicated)} ran twice; first recovered run {first_recovered - restarted:.2f}s "
        "after the restart"
    )
    assert "@example.com" not in first.output + second.output
