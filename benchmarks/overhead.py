"""Per-request overhead, in-process: the ASGI app driven directly, no sockets.

    python benchmarks/overhead.py [--requests 5000] [--rounds 15] [--smoke]

Each variant handles ``--requests`` requests (a fake receive/send; the loop is yielded to
every ``--batch`` requests, as a server does between reads) and, when it adds a task, the
clock runs until every task has run: the measured cost includes running the side effect,
not just queueing it. Variants run interleaved, round after round; the table shows the
median time per request and the median of the per-round ratios to the bare app.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import _support
import aiojobs
import asgi_background
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from after_response import AfterResponseMiddleware

COMPLETION: _support.Completion


async def noop_task() -> None:
    """The side effect: does nothing but report that it ran."""
    COMPLETION.tick()


async def bare_endpoint(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def after_response_endpoint(request: Request) -> PlainTextResponse:
    request.state.after_response.add(noop_task)
    return PlainTextResponse("ok")


async def starlette_endpoint(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok", background=BackgroundTask(noop_task))


async def asgi_background_endpoint(request: Request) -> PlainTextResponse:
    await asgi_background.BackgroundTasks(request.scope).add_task(noop_task)
    return PlainTextResponse("ok")


TASKS: set[asyncio.Task[None]] = set()


async def create_task_endpoint(request: Request) -> PlainTextResponse:
    # The floor for "one task": a bare asyncio task, started before the response, with no
    # bounds, accounting, timeout or context handling.
    task = asyncio.get_running_loop().create_task(noop_task())
    TASKS.add(task)
    task.add_done_callback(TASKS.discard)
    return PlainTextResponse("ok")


class SendWatcher:
    """The floor for "no task": a pure ASGI middleware that only watches for the final body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        complete = False

        async def send_watching(message: Message) -> None:
            nonlocal complete
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True

        await self.app(scope, receive, send_watching)


def starlette(endpoint: Callable[[Request], Any]) -> Starlette:
    return Starlette(routes=[Route("/", endpoint)])


@dataclass
class Variant:
    name: str
    build: Callable[[], AbstractAsyncContextManager[ASGIApp]]
    tasks_per_request: int
    #: Which target, if any, this variant's ratio is checked against.
    target: float | None = None
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


@asynccontextmanager
async def with_lifespan(app: ASGIApp) -> AsyncIterator[ASGIApp]:
    async with _support.lifespan(app):
        yield app


@asynccontextmanager
async def without_lifespan(app: ASGIApp) -> AsyncIterator[ASGIApp]:
    yield app


def tracer_provider() -> TracerProvider:
    """An SDK provider that samples every span and hands it to a processor doing nothing."""
    provider = TracerProvider()
    provider.add_span_processor(SpanProcessor())
    return provider


@asynccontextmanager
async def aiojobs_app() -> AsyncIterator[ASGIApp]:
    scheduler = aiojobs.Scheduler(limit=100, pending_limit=10_000)

    async def endpoint(request: Request) -> PlainTextResponse:
        await scheduler.spawn(noop_task())
        return PlainTextResponse("ok")

    try:
        yield starlette(endpoint)
    finally:
        await scheduler.close()


def variants() -> list[Variant]:
    ar = AfterResponseMiddleware
    return [
        Variant("bare Starlette app", lambda: with_lifespan(starlette(bare_endpoint)), 0),
        Variant(
            "after-response, no task",
            lambda: with_lifespan(ar(starlette(bare_endpoint))),
            0,
            target=1.05,
        ),
        Variant(
            "floor: pass-through middleware watching send, no task",
            lambda: with_lifespan(SendWatcher(starlette(bare_endpoint))),
            0,
        ),
        Variant(
            "after-response, one task",
            lambda: with_lifespan(ar(starlette(after_response_endpoint))),
            1,
            target=1.3,
        ),
        Variant(
            "after-response, one task, tracing on",
            lambda: with_lifespan(
                ar(starlette(after_response_endpoint), tracer_provider=tracer_provider())
            ),
            1,
        ),
        Variant(
            "after-response, one task, metrics on",
            lambda: with_lifespan(
                ar(
                    starlette(after_response_endpoint),
                    meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
                )
            ),
            1,
        ),
        Variant(
            "after-response, one task, no lifespan",
            lambda: without_lifespan(ar(starlette(after_response_endpoint))),
            1,
        ),
        Variant(
            "Starlette BackgroundTasks, one task",
            lambda: with_lifespan(starlette(starlette_endpoint)),
            1,
        ),
        Variant(
            "asgi-background, one task",
            lambda: with_lifespan(
                asgi_background.BackgroundTaskMiddleware(starlette(asgi_background_endpoint))
            ),
            1,
        ),
        Variant("aiojobs spawn, one task (starts before the response)", aiojobs_app, 1),
        Variant(
            "floor: bare asyncio.create_task, one task (starts before the response)",
            lambda: with_lifespan(starlette(create_task_endpoint)),
            1,
        ),
    ]


async def run_requests(
    app: ASGIApp, requests: int, batch: int, tasks: int, clock: Callable[[], float]
) -> float:
    """Seconds to handle ``requests`` requests and run every task they added."""
    COMPLETION.expect(requests * tasks)
    http_scope, receive, send = _support.http_scope, _support.receive_request, _support.discard_send
    sleep = asyncio.sleep
    gc.collect()
    started = clock()
    for i in range(requests):
        await app(http_scope(), receive, send)
        if i % batch == batch - 1:
            await sleep(0)
    if not await COMPLETION.wait(timeout=60):
        raise RuntimeError(f"only {COMPLETION.count} of {COMPLETION.target} tasks ran")
    return clock() - started


async def measure(args: argparse.Namespace) -> list[Variant]:
    global COMPLETION
    COMPLETION = _support.Completion()
    chosen = variants()
    if args.only:
        chosen = chosen[:1] + [v for v in chosen[1:] if any(o in v.name for o in args.only)]
    bare = chosen[0]
    for round_number in range(args.rounds + 1):  # round 0 warms up and is not counted
        order = chosen[1:]
        random.shuffle(order)
        timings: dict[str, float] = {}
        for variant in [bare, *order]:
            async with variant.build() as app:
                timings[variant.name] = await run_requests(
                    app, args.requests, args.batch, variant.tasks_per_request, CLOCKS[args.clock]
                )
        if round_number == 0:
            continue
        for variant in chosen:
            variant.seconds.append(timings[variant.name])
            variant.ratios.append(timings[variant.name] / timings[bare.name])
    return chosen


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="requests per variant and round")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (medians)")
    parser.add_argument("--batch", type=int, default=50, help="requests between loop yields")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: this process's CPU time (robust on a shared machine); wall: elapsed time",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="TEXT", help="only variants whose name contains TEXT"
    )
    parser.add_argument("--smoke", action="store_true", help="a few seconds, numbers meaningless")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.rounds = 200, 1
    # The no-lifespan variant warns once; the warning is documented, not news here.
    logging.getLogger("after_response").setLevel(logging.ERROR)

    chosen = asyncio.run(measure(args))

    _support.print_machine()
    print(
        f"{args.requests:,} requests per variant and round, {args.rounds} interleaved rounds, "
        f"loop yielded every {args.batch} requests; {args.clock} time, including running "
        "every task to completion.\n"
    )
    bare_us = _support.median(chosen[0].seconds) / args.requests * 1e6
    rows = []
    for variant in chosen:
        per_request_us = _support.median(variant.seconds) / args.requests * 1e6
        rows.append(
            (
                variant.name,
                per_request_us,
                per_request_us - bare_us,
                f"{_support.median(variant.ratios):.3f}x",
            )
        )
    _support.print_table(
        "Per-request overhead (in-process, median of rounds)",
        ("variant", "µs/request", "µs over bare", "x bare"),
        rows,
    )
    targets = []
    for variant in chosen:
        if variant.target is not None:
            ratio = _support.median(variant.ratios)
            targets.append(
                (
                    f"{variant.name} ≤ {variant.target}x bare",
                    f"{ratio:.3f}x",
                    None if args.smoke else ratio <= variant.target,
                )
            )
    _support.print_targets(targets)
    return 0


if __name__ == "__main__":
    _support.main_guard(main)
