"""The phases ``engines.py`` measures, and the engine worker it runs them against.

The web app (``engines_app.py``) runs in this process, driven by in-process requests (no
sockets); ``PublishClock`` wraps the engine's ``publish`` to time each request's hand-off.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import _support

HERE = _support.BENCHMARKS_DIR
READY = {"celery": " ready.", "taskiq": "Listening started."}


def worker_command(engine: str) -> list[str]:
    if engine == "celery":
        command = [sys.executable, "-m", "celery", "-A", "engines_app", "worker", "--pool=solo"]
        command += ["--loglevel=INFO", "--hostname", f"bench-{uuid.uuid4().hex[:8]}@%h"]
        return [*command, "--without-mingle", "--without-gossip", "--without-heartbeat"]
    return [sys.executable, "-m", "taskiq", "worker", "engines_app:broker", "--workers", "1"]


@contextmanager
def worker(engine: str, redis_url: str, log: Path, cpu: int | None) -> Iterator[None]:
    """The engine's worker, from ``benchmarks/``, until the block ends (SIGTERM, then
    SIGKILL to its process group)."""
    env = {**os.environ, "ENGINES_BENCH_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as output:
        process = subprocess.Popen(
            _support.pinned(worker_command(engine), cpu),
            cwd=HERE,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while READY[engine] not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {engine} worker did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(5)
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


async def request(app: Any, path: str, query: str) -> tuple[float, float]:
    """One in-process POST: when it was sent, and when its response's last message went out."""
    status, done = 0, 0.0

    async def send(message: Any) -> None:
        nonlocal status, done
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            done = time.perf_counter()

    scope = _support.http_scope(path, method="POST", query_string=query.encode())
    started = time.perf_counter()
    await app(scope, _support.receive_request, send)
    if status != 200:
        raise RuntimeError(f"POST {path}?{query} answered {status}")
    return started, done


class PublishClock:
    """Wraps the engine's ``publish``: when each request's task was published (its ``seq``,
    the task's first argument). Reading the message body is fine in a benchmark."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.original = engine.publish
        self.published: dict[int, float] = {}
        self.waiters: dict[int, asyncio.Event] = {}
        #: Seconds spent in the engine's publish, and the messages it published.
        self.busy = 0.0
        self.messages = 0

    async def publish(self, messages: Any) -> None:
        called = time.perf_counter()
        await self.original(messages)
        now = time.perf_counter()
        self.busy += now - called
        self.messages += len(messages)
        for message in messages:
            seq = message.body["args"][0]
            self.published.setdefault(seq, now)
            if seq in self.waiters:
                self.waiters[seq].set()

    def __enter__(self) -> PublishClock:
        self.engine.publish = self.publish
        return self

    def __exit__(self, *exc_info: object) -> None:
        del self.engine.publish  # the class's method again


async def measure_lag(app: Any, clock: PublishClock, count: int) -> list[float]:
    """Publish lag in ms, one request at a time (each waits for its publish)."""
    lags = []
    for seq in range(1, count + 1):
        clock.waiters[seq] = asyncio.Event()
        _, done = await request(app, "/handoff", f"seq={seq}&counter=lag")
        await asyncio.wait_for(clock.waiters[seq].wait(), 30)
        lags.append((clock.published[seq] - done) * 1000)
    return lags


async def measure_throughput(
    app: Any, clock: PublishClock, args: argparse.Namespace
) -> dict[str, float]:
    """``args.tasks`` durable adds by ``args.clients`` clients: stored/s and published/s."""
    requests = args.tasks // args.per_request
    before = app.stats().handed_off
    queue = iter(range(requests))
    query = f"n={args.per_request}&counter=bulk"

    async def client() -> None:
        for _ in queue:
            await request(app, "/handoff", query)

    busy, messages = clock.busy, clock.messages
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.clients)))
    stored = time.perf_counter()
    deadline = stored + 120
    while app.stats().handed_off - before < requests * args.per_request:
        if time.perf_counter() > deadline:
            raise RuntimeError("the hand-off did not finish within 120 s")
        await asyncio.sleep(0.001)
    published = time.perf_counter()
    total = requests * args.per_request
    return {
        "tasks": total,
        "stored_per_s": total / (stored - started),
        "published_per_s": total / (published - started),
        # Where the time went: the share in the engine's publish, and its cost per message.
        "in_publish": (clock.busy - busy) / (published - started),
        "publish_us": (clock.busy - busy) / (clock.messages - messages) * 1e6,
    }


async def measure_latency(app: Any, args: argparse.Namespace, clients: int) -> dict[str, Any]:
    """Response latencies (ms) of ``/handoff`` and ``/direct``, interleaved in rounds, and
    the seconds each took in all.

    Each client sends its next request as soon as its previous response is complete (as
    wrk does), and a latency runs from that moment: so it includes the time the request
    waited for the loop, which a handler that blocks the loop (``.delay()``) makes the
    other clients' requests wait. Each client yields to the others before it sends, as a
    server's loop turns to its other connections: an in-process request that never awaits
    would otherwise run the whole round in one client.
    """
    latencies: dict[str, list[float]] = {"handoff": [], "direct": []}
    seconds = dict.fromkeys(latencies, 0.0)
    for _ in range(args.rounds):
        for path in ("handoff", "direct"):
            remaining = iter(range(args.requests))
            begun = time.perf_counter()

            async def client(path: str = path, remaining: Iterator[int] = remaining) -> None:
                ready = time.perf_counter()
                for _ in remaining:
                    await asyncio.sleep(0)
                    _, done = await request(app, f"/{path}", f"counter={path}")
                    latencies[path].append((done - ready) * 1000)
                    ready = done

            await asyncio.gather(*(client() for _ in range(clients)))
            seconds[path] += time.perf_counter() - begun
    return {"latency": latencies, "seconds": seconds}


async def session(
    engine: str, db: Path, synchronous: str, args: argparse.Namespace, full: bool
) -> dict[str, Any]:
    """One app's lifespan: lag and throughput (``full``), then latency."""
    import engines_app

    app = engines_app.create_app(engine, str(db), synchronous=synchronous)
    handle = engines_app.celery_engine if engine == "celery" else engines_app.taskiq_engine
    result: dict[str, Any] = {}
    with PublishClock(handle) as clock:
        async with _support.lifespan(app):
            # The first publish also waits for the engine's start: not part of the lag.
            await measure_lag(app, clock, 1)
            if full:
                result["lag"] = await measure_lag(app, clock, args.lag_requests)
                result["throughput"] = await measure_throughput(app, clock, args)
            result["latency"] = {
                clients: await measure_latency(app, args, clients)
                for clients in args.latency_clients
            }
            drained = await app.drain(timeout=120)
        result["stats"] = app.stats()
    result["drained"] = drained
    return result


def expected_runs(args: argparse.Namespace, sessions: int) -> dict[str, int]:
    per_latency = args.rounds * args.requests * len(args.latency_clients) * sessions
    return {
        "lag": args.lag_requests + sessions,
        "bulk": (args.tasks // args.per_request) * args.per_request,
        "handoff": per_latency,
        "direct": per_latency,
    }


def wait_for_worker(expected: dict[str, int], timeout: float) -> dict[str, int]:
    """Poll the worker's counters until they reach ``expected`` or ``timeout`` passes."""
    import engines_app

    deadline = time.monotonic() + timeout
    while True:
        ran = {counter: engines_app.ran(counter) for counter in expected}
        if ran == expected or time.monotonic() > deadline:
            return ran
        time.sleep(0.1)
