"""The measurements of ``durable.py``, one function per phase: through uvicorn and wrk
(one client, then many connections), end to end in one process, and recovery after
``kill -9``. Each returns plain numbers; ``durable.py`` compares and prints them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _support
import durable_app
import durable_servers
import load
from starlette.types import Receive, Scope, Send

import after_response
from after_response import AfterResponseMiddleware, SQLiteStore


@dataclass(frozen=True)
class Variant:
    """One way of handing the side effect over."""

    key: str
    label: str
    options: tuple[str, ...]  # durable_app.py's variant and options
    appendfsync: str | None = None  # the Redis broker's, for Celery


VARIANTS = {
    v.key: v
    for v in (
        Variant("memory", "after-response, in memory", ("memory",)),
        Variant("full", "after-response durable, FULL", ("durable", "--synchronous", "FULL")),
        Variant("normal", "after-response durable, NORMAL", ("durable", "--synchronous", "NORMAL")),
        Variant("celery", "Celery .delay(), Redis fsync 1/s", ("celery",), "everysec"),
        Variant("celery-always", "Celery .delay(), Redis fsync always", ("celery",), "always"),
        Variant(
            "celery-thread",
            "Celery .delay() in a thread, fsync 1/s",
            ("celery-thread",),
            "everysec",
        ),
    )
}


def wrk(url: str, connections: int, seconds: float, cpu: int | None) -> dict[str, Any]:
    """wrk's counts and latency percentiles (ms) for ``seconds`` of POSTs to ``url``."""
    raw = load.run_wrk(argparse.Namespace(threads=1, connections=connections), url, seconds, cpu)
    seconds_measured = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "requests_per_s": raw["requests"] / seconds_measured,
        "p50": raw["latency_us"]["p50"] / 1000,
        "p99": raw["latency_us"]["p99"] / 1000,
        "errors": sum(raw["errors"].values()) + raw["non_2xx"],
    }


def measure_http(
    args: argparse.Namespace, variant: Variant, db: Path, broker: Any, cpus: tuple[Any, Any]
) -> dict[str, Any]:
    """One server for ``variant``: one client, then ``--connections`` per effects count."""
    server_cpu, client_cpu = cpus
    options = [*variant.options, "--db", str(db)]
    if broker is not None:
        broker.reset(variant.appendfsync)
        options += ["--broker", broker.url]
    result: dict[str, Any] = {"load": {}}
    with durable_servers.serve(options[0], server_cpu, *options[1:]) as (url, _):
        if args.warmup:
            wrk(url + "/checkout?n=1", 1, args.warmup, client_cpu)
        result["one"] = wrk(url + "/checkout?n=1", 1, args.latency_duration, client_cpu)
        for count in args.effects:
            target = f"{url}/checkout?n={count}"
            if args.warmup:
                wrk(target, args.connections, args.warmup, client_cpu)
            measured = wrk(target, args.connections, args.duration, client_cpu)
            # Every 2xx response's side effects were stored (published) before it was sent.
            measured["effects_per_s"] = measured["requests_per_s"] * count
            result["load"][count] = measured
        drained = _support.post(url, f"/bench/drain?timeout={args.drain_timeout}", timeout=300)
    if broker is not None:
        handed, done = drained["published"], broker.queued()
    else:
        stats = drained["stats"]
        # Durable: every task added was stored, and no row is left once all were marked done.
        stored = stats["stored"] if "rows" in drained else stats["added"]
        left = sum(drained.get("rows", {}).values())
        handed, done = stats["added"], min(drained["runs"], stats["succeeded"], stored - left)
    result["accounting"] = (handed, done)
    return result


async def end_to_end(store: SQLiteStore | None, requests: int, per_request: int) -> float:
    """Tasks per second, in one process, from the first request to the last task run and
    (durable) marked done; ``RuntimeError`` if any task is missing."""
    durable = store is not None

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        adder: Any = after_response.current()
        if durable:
            adder = adder.options(durable=True)
        for order in range(per_request):
            adder.add(durable_app.send_receipt, "ada@example.com", order)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    total = requests * per_request
    middleware = AfterResponseMiddleware(app, store=store, max_pending=total)
    async with _support.lifespan(middleware):
        runs_before = durable_app.COUNTS.runs
        remaining = iter(range(requests))

        async def client() -> None:
            for _ in remaining:
                scope = _support.http_scope("/checkout", method="POST")
                await middleware(scope, _support.receive_request, _support.discard_send)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(16)))
        settled = await middleware.drain(timeout=120)
        if store is not None:
            await store.flush()
        elapsed = time.perf_counter() - started
        runs = durable_app.COUNTS.runs - runs_before
        rows = store.count_by_state() if store is not None else {}
    if not settled or runs != total or middleware.stats().succeeded != total or any(rows.values()):
        raise RuntimeError(f"end to end: {runs:,} of {total:,} tasks ran; rows left: {rows}")
    return total / elapsed


def measure_end_to_end(
    args: argparse.Namespace, directory: Path, cpu: int | None
) -> dict[str, float]:
    """Median tasks/s per variant, this process pinned to the server's CPU meanwhile."""
    allowed = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    rates: dict[str, list[float]] = {"memory": [], "full": [], "normal": []}
    try:
        for round_ in range(args.rounds):
            for key, runs in rates.items():
                store = None
                if key != "memory":
                    path = directory / f"end-to-end-{key}-{round_}.sqlite3"
                    store = SQLiteStore(path, synchronous=key.upper())
                runs.append(asyncio.run(end_to_end(store, args.e2e_requests, args.e2e_tasks)))
    finally:
        os.sched_setaffinity(0, allowed)
    return {key: _support.median(runs) for key, runs in rates.items()}


async def unfinished_rows(path: Path) -> int:
    store = SQLiteStore(path)
    await store.open("durable-benchmark-reader")
    try:
        counts = store.count_by_state()
    finally:
        await store.close()
    return counts["queued"] + counts["running"] + counts["retry_wait"]


def measure_recovery(args: argparse.Namespace, db: Path, cpus: tuple[Any, Any]) -> dict[str, Any]:
    """``kill -9`` a durable (FULL) server under load, restart it on the same file, and time
    the restart, its first recovered run, and its recovery of every unfinished task."""
    server_cpu, client_cpu = cpus
    options = ["--db", str(db), "--owner-timeout", str(args.owner_timeout)]
    options += ["--effect-seconds", str(args.recovery_effect_seconds)]
    with durable_servers.serve("durable", server_cpu, *options) as (url, server):
        command = ["wrk", "-t1", f"-c{args.connections}", "-d600s", "-s"]
        command += [str(load.HERE / "wrk_login.lua"), url + "/checkout?n=1"]
        loader = subprocess.Popen(_support.pinned(command, client_cpu), stdout=subprocess.DEVNULL)
        try:
            time.sleep(args.recovery_load)  # the load before the kill, not a synchronization
        finally:
            server.kill()
            killed_at = time.monotonic()
            server.wait()
            loader.kill()
            loader.wait()
    unfinished = asyncio.run(unfinished_rows(db))
    restarted_at = time.monotonic()
    with durable_servers.serve("durable", server_cpu, *options) as (url, _):
        ready_at = time.monotonic()
        deadline = ready_at + args.owner_timeout + 60
        while True:  # a bounded poll: recovery claims once a second
            drained = _support.post(url, "/bench/drain?timeout=30", timeout=60)
            if drained["recovered"] >= unfinished or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        first = drained["first_recovered_at"]
    return {
        "unfinished": unfinished,
        "recovered": drained["recovered"],
        "left": sum(drained["rows"].values()),
        "ready_s": ready_at - restarted_at,
        "first_after_restart_s": (first - restarted_at) if first else float("nan"),
        "first_after_kill_s": (first - killed_at) if first else float("nan"),
    }
