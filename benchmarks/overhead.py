"""Per-request overhead, in-process: the ASGI app driven directly, no sockets.

    python benchmarks/overhead.py [--requests 5000] [--rounds 15] [--smoke]

Each variant handles ``--requests`` requests (a fake receive/send; the loop is yielded to
every ``--batch`` requests, as a server does between reads) and, when it adds a task, the
clock runs until every task has run: the measured cost includes running the side effect,
not just queueing it. Variants run interleaved, round after round; the table shows the
median time per request and the median of the per-round ratios to the bare app.

The targets are stated against floor rows measured in the same run (a pass-through
middleware, a bare ``create_task`` per request, the same plus one SDK span), so that a
target means the same on any machine; each derived number is computed within a round, and
the median over rounds is reported.
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
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from after_response import AfterResponseMiddleware

SendWatcher = _support.SendWatcher

COMPLETION: _support.Completion

BARE = "bare Starlette app"
NO_TASK = "after-response, no task"
NO_WATCHDOG = "after-response, no task, loop watchdog off"
FLOOR_SEND = "floor: pass-through middleware watching send, no task"
ONE_TASK = "after-response, one task"
FLOOR_TASK = "floor: bare create_task per request, run to completion"
TRACING = "after-response, one task, tracing on"
FLOOR_SPAN = "floor: create_task plus one SDK span (same no-op span processor)"
METRICS = "after-response, one task, metrics on"
NO_LIFESPAN = "after-response, one task, no lifespan"


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


async def create_task_endpoint(request: Request) -> PlainTextResponse:
    _support.start_task(noop_task())  # in the handler: it starts before the response is sent
    return PlainTextResponse("ok")


def starlette(endpoint: Callable[[Request], Any]) -> Starlette:
    return Starlette(routes=[Route("/", endpoint)])


@dataclass
class Variant:
    name: str
    build: Callable[[], AbstractAsyncContextManager[ASGIApp]]
    tasks_per_request: int
    #: µs per request, one value per counted round.
    micros: list[float] = field(default_factory=list)


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


def span_floor_app() -> ASGIApp:
    """The tracing floor: a bare task per request that starts and ends one SDK span."""
    tracer = tracer_provider().get_tracer("overhead-floor")

    async def traced_noop() -> None:
        span = tracer.start_span("after_response noop_task", kind=SpanKind.INTERNAL)
        COMPLETION.tick()
        span.end()

    return SendWatcher(starlette(bare_endpoint), traced_noop)


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
    adding = after_response_endpoint
    return [
        Variant(BARE, lambda: with_lifespan(starlette(bare_endpoint)), 0),
        Variant(NO_TASK, lambda: with_lifespan(ar(starlette(bare_endpoint))), 0),
        Variant(
            NO_WATCHDOG,
            lambda: with_lifespan(ar(starlette(bare_endpoint), loop_block_threshold=None)),
            0,
        ),
        Variant(FLOOR_SEND, lambda: with_lifespan(SendWatcher(starlette(bare_endpoint))), 0),
        Variant(ONE_TASK, lambda: with_lifespan(ar(starlette(adding))), 1),
        Variant(
            FLOOR_TASK, lambda: with_lifespan(SendWatcher(starlette(bare_endpoint), noop_task)), 1
        ),
        Variant(
            TRACING,
            lambda: with_lifespan(ar(starlette(adding), tracer_provider=tracer_provider())),
            1,
        ),
        Variant(FLOOR_SPAN, lambda: with_lifespan(span_floor_app()), 1),
        Variant(
            METRICS,
            lambda: with_lifespan(
                ar(
                    starlette(adding),
                    meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
                )
            ),
            1,
        ),
        Variant(NO_LIFESPAN, lambda: without_lifespan(ar(starlette(adding))), 1),
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
            "bare create_task in the handler (starts before the response)",
            lambda: with_lifespan(starlette(create_task_endpoint)),
            1,
        ),
    ]


@dataclass
class Target:
    """A limit on a number derived, round by round, from the variants' µs per request."""

    description: str
    #: The derived number of one round, from ``{variant name: µs per request}``.
    value: Callable[[dict[str, float]], float]
    limit: float
    unit: str  # "x" (a ratio) or "µs"
    #: Printed beside the measured value: the floor it is compared with, in the same run.
    beside: tuple[Callable[[dict[str, float]], float], str] | None = None


TARGETS = {
    (NO_TASK, FLOOR_SEND): Target(
        "no task ≤ 1.10x bare (beside it: the pass-through floor, x bare)",
        lambda r: r[NO_TASK] / r[BARE],
        1.10,
        "x",
        beside=(lambda r: r[FLOOR_SEND] / r[BARE], "x"),
    ),
    (ONE_TASK, FLOOR_TASK): Target(
        "one task: its cost over bare ≤ 1.5x the bare create_task floor's (beside it: "
        "the floor's µs over bare)",
        lambda r: (r[ONE_TASK] - r[BARE]) / (r[FLOOR_TASK] - r[BARE]),
        1.5,
        "x",
        beside=(lambda r: r[FLOOR_TASK] - r[BARE], "µs"),
    ),
    (TRACING, FLOOR_SPAN): Target(
        "tracing on: µs per task beyond the create_task + one SDK span floor ≤ 10 µs",
        lambda r: r[TRACING] - r[FLOOR_SPAN],
        10.0,
        "µs",
    ),
    (METRICS, ONE_TASK): Target(
        "metrics on: µs per task over metrics off ≤ 5 µs",
        lambda r: r[METRICS] - r[ONE_TASK],
        5.0,
        "µs",
    ),
    (NO_LIFESPAN, ONE_TASK): Target(
        "no lifespan: time per request ≤ 1.00x the lifespan path's",
        lambda r: r[NO_LIFESPAN] / r[ONE_TASK],
        1.0,
        "x",
    ),
}


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
        for variant in [bare, *order]:
            async with variant.build() as app:
                seconds = await run_requests(
                    app, args.requests, args.batch, variant.tasks_per_request, CLOCKS[args.clock]
                )
            if round_number > 0:
                variant.micros.append(seconds / args.requests * 1e6)
    return chosen


def per_round(chosen: list[Variant], value: Callable[[dict[str, float]], float]) -> float:
    """The median over rounds of ``value`` computed within each round."""
    rounds = len(chosen[0].micros)
    return _support.median(
        value({variant.name: variant.micros[i] for variant in chosen}) for i in range(rounds)
    )


def print_report(chosen: list[Variant], args: argparse.Namespace) -> None:
    rows = []
    for variant in chosen:
        name = variant.name
        over_bare = per_round(chosen, lambda r: r[name] - r[BARE])  # noqa: B023 (used at once)
        ratio = per_round(chosen, lambda r: r[name] / r[BARE])  # noqa: B023
        rows.append((name, _support.median(variant.micros), over_bare, f"{ratio:.3f}x"))
    _support.print_table(
        "Per-request overhead (in-process, median of rounds)",
        ("variant", "µs/request", "µs over bare", "x bare"),
        rows,
    )
    present = {variant.name for variant in chosen}
    targets = []
    for needs, target in TARGETS.items():
        if not present.issuperset(needs):
            continue
        measured = per_round(chosen, target.value)
        text = _measured(measured, target.unit)
        if target.beside is not None:
            floor, unit = target.beside
            text += f" (floor: {_measured(per_round(chosen, floor), unit)})"
        targets.append((target.description, text, None if args.smoke else measured <= target.limit))
    _support.print_targets(targets)


def _measured(value: float, unit: str) -> str:
    return f"{value:.3f}x" if unit == "x" else f"{value:+.2f} µs"


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
    print_report(chosen, args)
    return 0


if __name__ == "__main__":
    _support.main_guard(main)
