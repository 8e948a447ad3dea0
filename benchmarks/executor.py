"""Executor throughput and scheduling delay, in-process, pinned to one CPU.

    python benchmarks/executor.py [--tasks 20000] [--rounds 5] [--smoke]

Throughput: no-op ``async def`` tasks per second through AfterResponseMiddleware's executor
(lifespan started, so tasks run in the background executor), added by one request or spread
over many requests, against aiojobs, asgi-background and bare ``asyncio.create_task``. The
app is a minimal raw ASGI app so that the framework's own cost does not hide the executor's.

Scheduling delay: from the moment the final ``http.response.body`` send returns to the
moment the task starts, with requests arriving at a steady rate (a fraction of the measured
capacity) and when requests arrive faster than tasks can run (saturation).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Awaitable, Callable

import _support
import aiojobs
import asgi_background
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import after_response
from after_response import AfterResponseMiddleware

COMPLETION = _support.Completion()
START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
BODY = {"type": "http.response.body", "body": b"ok", "more_body": False}


async def noop() -> None:
    COMPLETION.tick()


def adding_app(tasks_per_request: int) -> ASGIApp:
    """A raw ASGI app whose every request adds ``tasks_per_request`` no-op tasks."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        collector = after_response.current()
        for _ in range(tasks_per_request):
            collector.add(noop)
        await send(START)
        await send(BODY)

    return app


def asgi_background_app(tasks_per_request: int) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        background = asgi_background.BackgroundTasks(scope)
        for _ in range(tasks_per_request):
            await background.add_task(noop)
        await send(START)
        await send(BODY)

    async def router(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await app(scope, receive, send)

    return asgi_background.BackgroundTaskMiddleware(router)


async def through_requests(app: ASGIApp, requests: int, tasks_per_request: int) -> float:
    """Seconds for ``requests`` requests to add their tasks and for every task to run."""
    COMPLETION.expect(requests * tasks_per_request)
    receive, send = _support.receive_request, _support.discard_send
    gc.collect()
    started = time.perf_counter()
    for i in range(requests):
        await app(_support.http_scope(), receive, send)
        if i % 50 == 49:
            await asyncio.sleep(0)  # a server reads sockets between requests
    await COMPLETION.wait()
    return time.perf_counter() - started


async def after_response_case(requests: int, per_request: int) -> float:
    middleware = AfterResponseMiddleware(adding_app(per_request))
    async with _support.lifespan(middleware):
        return await through_requests(middleware, requests, per_request)


async def asgi_background_case(requests: int, per_request: int) -> float:
    app = asgi_background_app(per_request)
    async with _support.lifespan(app):
        return await through_requests(app, requests, per_request)


async def aiojobs_case(tasks: int) -> float:
    COMPLETION.expect(tasks)
    scheduler = aiojobs.Scheduler(limit=100, pending_limit=10_000)
    gc.collect()
    started = time.perf_counter()
    for _ in range(tasks):
        await scheduler.spawn(noop())
    await COMPLETION.wait()
    elapsed = time.perf_counter() - started
    await scheduler.close()
    return elapsed


async def create_task_case(tasks: int) -> float:
    COMPLETION.expect(tasks)
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[None]] = set()
    gc.collect()
    started = time.perf_counter()
    for _ in range(tasks):
        task = loop.create_task(noop())
        running.add(task)
        task.add_done_callback(running.discard)
    await COMPLETION.wait()
    return time.perf_counter() - started


def throughput_cases(tasks: int) -> list[tuple[str, Callable[[], Awaitable[float]], bool]]:
    """(name, run, is ours) for each case; each run handles ``tasks`` tasks."""
    return [
        ("after-response: 1 request adds all tasks", lambda: after_response_case(1, tasks), True),
        (
            "after-response: 1 task per request",
            lambda: after_response_case(tasks, 1),
            True,
        ),
        (
            "after-response: 10 tasks per request",
            lambda: after_response_case(tasks // 10, 10),
            True,
        ),
        ("asgi-background: 1 task per request", lambda: asgi_background_case(tasks, 1), False),
        ("aiojobs Scheduler.spawn (limit=100)", lambda: aiojobs_case(tasks), False),
        ("bare asyncio.create_task (no limit)", lambda: create_task_case(tasks), False),
    ]


# -- scheduling delay -------------------------------------------------------------------------


#: Requests issued between two yields to the loop, at most (a server reads a few per turn).
BATCH = 8


async def delays_at_rate(
    rate: float | None, seconds: float, max_concurrency: int
) -> tuple[list[float], int, float]:
    """Delays (s) from final body send to task start, for requests arriving at ``rate``/s
    (``None``: as fast as the producer can issue them), one task each; also the number of
    requests issued and the achieved rate."""
    sent: dict[int, float] = {}
    started: dict[int, float] = {}
    clock = time.perf_counter

    async def probe(request_id: int) -> None:
        started[request_id] = clock()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        after_response.current().add(probe, scope["bench.id"])
        await send(START)
        await send(BODY)

    middleware = AfterResponseMiddleware(app, max_concurrency=max_concurrency)
    receive = _support.receive_request
    async with _support.lifespan(middleware):
        issued = 0
        gc.collect()
        begin = clock()
        now = begin
        while now - begin < seconds:
            # At most BATCH requests between two yields, at any rate: saturation is then the
            # same harness flat out, and its rate the capacity the levels are fractions of.
            due = issued + BATCH if rate is None else min(int((now - begin) * rate), issued + BATCH)
            while issued < due:
                request_id = issued

                async def send(message: Message, request_id: int = request_id) -> None:
                    if message["type"] == "http.response.body":
                        sent[request_id] = clock()

                await middleware(_support.http_scope(**{"bench.id": request_id}), receive, send)
                issued += 1
            # Yield to the loop, as a server does between reads; spinning (rather than
            # sleeping until the next arrival) keeps timer granularity out of the delays.
            await asyncio.sleep(0)
            now = clock()
        achieved = issued / (now - begin)
        await middleware.drain(timeout=60)
    delays = [started[i] - sent[i] for i in sent if i in started]
    return delays, issued, achieved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks per throughput run")
    parser.add_argument("--rounds", type=int, default=5, help="throughput rounds (median)")
    parser.add_argument("--delay-seconds", type=float, default=2.0, help="seconds per load level")
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the last)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, numbers meaningless")
    args = parser.parse_args()
    if args.smoke:
        args.tasks, args.rounds, args.delay_seconds = 2000, 1, 0.2
    info = _support.machine()
    cpu = _support.pin_to_cpu(args.cpu)

    results = asyncio.run(run(args))
    _support.print_machine(info)
    print(f"Pinned to CPU {cpu}." if cpu is not None else "Not pinned.", end=" ")
    print(
        f"{args.tasks:,} no-op async tasks per run, median of {args.rounds} rounds; "
        "after-response with its defaults (max_concurrency=100, max_pending=10,000).\n"
    )
    throughput, delays = results
    best_ours = max(rate for name, rate, ours in throughput if ours)
    reference = dict((name, rate) for name, rate, _ in throughput)[
        "bare asyncio.create_task (no limit)"
    ]
    _support.print_table(
        "Executor throughput (no-op tasks, one core)",
        ("case", "tasks/s", "µs/task", "vs bare create_task"),
        [(name, rate, 1e6 / rate, f"{rate / reference:.2f}x") for name, rate, _ in throughput],
    )
    _support.print_table(
        "Scheduling delay: final body sent → task started (after-response, one task per request)",
        ("offered load", "requests/s achieved", "requests", "p50 µs", "p99 µs", "max µs"),
        [
            (
                label,
                achieved,
                issued,
                _support.percentile(values, 50) * 1e6,
                _support.percentile(values, 99) * 1e6,
                max(values) * 1e6 if values else float("nan"),
            )
            for label, values, issued, achieved, _ in delays
        ],
    )
    judge = not args.smoke
    below = [values for _, values, _, _, saturated in delays if not saturated]
    worst_p99 = max((_support.percentile(values, 99) for values in below), default=float("nan"))
    _support.print_targets(
        [
            (
                "≥ 50,000 no-op tasks/s on one core (best after-response case)",
                f"{best_ours:,.0f} tasks/s",
                best_ours >= 50_000 if judge else None,
            ),
            (
                "scheduling delay p99 < 1 ms below saturation (worst level below saturation)",
                f"{worst_p99 * 1e6:,.0f} µs",
                worst_p99 < 0.001 if judge else None,
            ),
        ]
    )
    return 0


async def run(
    args: argparse.Namespace,
) -> tuple[list[tuple[str, float, bool]], list[tuple[str, list[float], int, float, bool]]]:
    cases = throughput_cases(args.tasks)
    timings: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for round_number in range(args.rounds + 1):  # round 0 warms up
        for name, case, _ in cases:
            elapsed = await case()
            if round_number:
                timings[name].append(elapsed)
    throughput = [
        (name, args.tasks / _support.median(timings[name]), ours) for name, _, ours in cases
    ]
    # Capacity: this same harness flat out (measured first, shown last).
    saturation = await delays_at_rate(None, args.delay_seconds, 100)
    capacity = saturation[2]
    levels: list[tuple[str, float, bool]] = [
        ("idle (100 requests/s)", 100.0, False),
        ("10% of capacity", 0.1 * capacity, False),
        ("50% of capacity", 0.5 * capacity, False),
        ("90% of capacity", 0.9 * capacity, False),
    ]
    delays: list[tuple[str, list[float], int, float, bool]] = []
    for label, rate, saturated in levels:
        values, issued, achieved = await delays_at_rate(rate, args.delay_seconds, 100)
        delays.append((label, values, issued, achieved, saturated))
    delays.append(("saturation (as fast as possible)", *saturation, True))
    return throughput, delays


if __name__ == "__main__":
    _support.main_guard(main)
