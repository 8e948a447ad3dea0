"""Where one request's one task spends its time: cProfile, grouped into the hot path's pieces.

    python benchmarks/profile_hot_path.py [--requests 20000] [--config plain tracing ...]
        [--top 12] [--smoke]

A minimal ASGI app (no framework) whose every request adds one no-op ``async def`` task
through ``AfterResponseMiddleware``, driven in-process as ``overhead.py`` drives its apps,
each task run to completion. For each configuration (``plain``: no OpenTelemetry SDK;
``tracing``: an SDK tracer provider with a no-op span processor; ``metrics``: an SDK meter
provider with an in-memory reader; ``no-lifespan``: no lifespan startup) it prints:

- the unprofiled cost per request, and over the same app without the middleware;
- a table of pieces (add, record, admission, spawn, attempt, accounting, telemetry...):
  the *exclusive* time of every profiled function, each function in exactly one piece, so
  the pieces add up to the whole. Functions are put in pieces by matching their file and
  name loosely (``PIECES``), so renames inside ``after_response`` mostly keep working; a
  function outside ``after_response`` (a builtin, asyncio, anyio) that no pattern names is
  charged to the pieces of the functions that called it;
- the after-response functions that cost the most.

cProfile adds a roughly fixed cost to every call, so call-heavy pieces look dearer than
they are; the "≈ µs unprofiled" column scales every piece by the same factor so that they
add up to the unprofiled total: an estimate, for comparing pieces, not a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import logging
import pstats
import re
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import _support
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from starlette.types import ASGIApp, Receive, Scope, Send

import after_response
from after_response import AfterResponseMiddleware

COMPLETION = _support.Completion()
START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
BODY = {"type": "http.response.body", "body": b"ok", "more_body": False}

#: Pieces of the hot path, first match wins, matched against "path/to/file.py:function".
OURS = r"after_response[/\\]"
PIECES: list[tuple[str, str]] = [
    ("side effect: the task's own code", r"profile_hot_path\.py:noop_task$"),
    (
        "record: task id, record, Task, context copy",
        r"_record\.py|task_id|copy_context|_task\.py:__init__$",
    ),
    (
        "admission: hand-over, submit, slot or queue",
        rf"{OURS}.*:(hand_over|submit\w*|_take|_admit\w*)$|_dispatch\.py",
    ),
    (
        "spawn: the asyncio task",
        rf"{OURS}.*:(_start|spawn|start_soon)$|:create_task$|add_done_callback"
        r"|'run' of '_contextvars",
    ),
    (
        "telemetry: after-response's checks and calls",
        r"_telemetry\.py|_tracing\.py|_metrics\.py|_logs\.py",
    ),
    ("OpenTelemetry: the API and SDK", r"opentelemetry[/\\]"),
    (
        "attempt: runner, deadline and its timer, call",
        rf"_runner\.py|{OURS}.*:(_run|\w*deadline\w*|_schedule|\w*timer|_expire|set_running_task)$",
    ),
    (
        "accounting: ledger, end, release, done",
        rf"_accounting\.py|_endings\.py|{OURS}.*:(_release|_done|end|_wake\w*)$",
    ),
    (
        "no lifespan: the request's own dispatcher and task owner",
        r"_inline\.py|run_inline|loop_handle|running_asyncio|_tasks\.py:__init__$",
    ),
    (
        "per request: middleware, collector, send wrapper",
        r"_middleware\.py|_collector\.py:(__init__|close|holding|handed_over|overflow)$",
    ),
    ("add: collector.add, callable checks, options", r"_collector\.py|_callable\.py|_options\.py"),
    ("other: after-response code not named above", OURS),
]
OUTSIDE = "outside: the app, the harness, the event loop"
Key = tuple[str, int, str]


async def noop_task() -> None:
    COMPLETION.tick()


def app(adds: bool) -> ASGIApp:
    """A raw ASGI app answering 200 "ok"; with ``adds``, each request adds ``noop_task``."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if adds:
            after_response.current().add(noop_task)
        await send(START)
        await send(BODY)

    return asgi


def middleware(config: str) -> AfterResponseMiddleware:
    options: dict[str, Any] = {}
    if config == "tracing":
        provider = TracerProvider()
        provider.add_span_processor(SpanProcessor())
        options["tracer_provider"] = provider
    elif config == "metrics":
        options["meter_provider"] = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return AfterResponseMiddleware(app(adds=True), **options)


async def run(asgi: ASGIApp, requests: int, tasks: int, lifespan: bool) -> float:
    """CPU seconds for ``requests`` requests and their tasks, run to completion."""
    async with _support.lifespan(asgi) if lifespan else _nothing():
        COMPLETION.expect(requests * tasks)
        scope, receive, send = _support.http_scope, _support.receive_request, _support.discard_send
        gc.collect()
        started = time.process_time()
        for i in range(requests):
            await asgi(scope(), receive, send)
            if i % 50 == 49:
                await asyncio.sleep(0)
        if not await COMPLETION.wait(timeout=60):
            raise RuntimeError(f"only {COMPLETION.count} of {COMPLETION.target} tasks ran")
        return time.process_time() - started


class _nothing:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


async def unprofiled(config: str, requests: int, rounds: int) -> tuple[float, float, float]:
    """Median µs per request: with the middleware and one task, the bare app, and the floor
    (a middleware that watches ``send`` and then starts one bare ``create_task``)."""
    ours, bare, floor = [], [], []
    lifespan = config != "no-lifespan"
    for _ in range(rounds):
        ours.append(await run(middleware(config), requests, 1, lifespan) / requests * 1e6)
        bare.append(await run(app(adds=False), requests, 0, True) / requests * 1e6)
        floor_app = _support.SendWatcher(app(adds=False), noop_task)
        floor.append(await run(floor_app, requests, 1, True) / requests * 1e6)
    return _support.median(ours), _support.median(bare), _support.median(floor)


async def profiled(config: str, requests: int) -> pstats.Stats:
    asgi = middleware(config)
    await run(asgi, min(requests, 1000), 1, config != "no-lifespan")  # warm caches
    profile = cProfile.Profile()
    profile.enable()
    await run(asgi, requests, 1, config != "no-lifespan")
    profile.disable()
    return pstats.Stats(profile)


def name_of(key: Key) -> str:
    filename, _, function = key
    return f"{filename.replace(chr(92), '/')}:{function}"


def pieces_by_function(stats: dict[Key, Any]) -> Callable[[Key], dict[str, float]]:
    """How each function's exclusive time splits among pieces (fractions adding up to 1)."""
    patterns = [(piece, re.compile(pattern)) for piece, pattern in PIECES]
    memo: dict[Key, dict[str, float]] = {}

    def split(key: Key, seen: frozenset[Key] = frozenset()) -> dict[str, float]:
        if key in memo:
            return memo[key]
        name = name_of(key)
        for piece, pattern in patterns:
            if pattern.search(name):
                memo[key] = {piece: 1.0}
                return memo[key]
        callers = stats[key][4] if key in stats else {}
        is_python = not name.startswith("~:")
        if key in seen or not callers or (is_python and "site-packages" not in name):
            result = {OUTSIDE: 1.0}  # the harness's or the app's own code, or a root
        else:
            # A builtin or a library function: charged to its callers, by call count.
            calls = sum(caller[1] for caller in callers.values()) or 1
            result = defaultdict(float)
            for caller, caller_stats in callers.items():
                for piece, share in split(caller, seen | {key}).items():
                    result[piece] += share * caller_stats[1] / calls
        if not seen:
            memo[key] = dict(result)
        return dict(result)

    return split


def report(config: str, stats: pstats.Stats, requests: int, timings: tuple[float, ...]) -> None:
    ours_us, bare_us, floor_us = timings
    table: dict[Key, Any] = stats.stats  # type: ignore[attr-defined]
    split = pieces_by_function(table)
    micros: dict[str, float] = defaultdict(float)
    calls: dict[str, float] = defaultdict(float)
    for key, (_, call_count, own_seconds, _, _) in table.items():
        for piece, share in split(key).items():
            micros[piece] += own_seconds * share / requests * 1e6
            calls[piece] += call_count * share / requests
    total = sum(micros.values())
    scale = ours_us / total if total else float("nan")
    print(
        f"**{config}**: {ours_us:.1f} µs per request unprofiled, {ours_us - bare_us:+.1f} µs "
        f"over the same app without the middleware ({bare_us:.1f} µs), where the floor (a "
        f"send-watching middleware starting one bare create_task) costs "
        f"{floor_us - bare_us:+.1f} µs; {total:.1f} µs profiled (x{1 / scale:.1f}).\n"
    )
    order = [piece for piece, _ in PIECES] + [OUTSIDE]
    rows = [
        (piece, calls[piece], micros[piece], f"{micros[piece] / total:.1%}", micros[piece] * scale)
        for piece in order
        if piece in micros
    ]
    rows.append(("total", sum(calls.values()), total, "100%", ours_us))
    _support.print_table(
        f"One request, one task, {config}: exclusive time by piece",
        ("piece", "calls/request", "µs profiled", "share", "≈ µs unprofiled"),
        rows,
    )


def print_top(config: str, stats: pstats.Stats, requests: int, top: int) -> None:
    table: dict[Key, Any] = stats.stats  # type: ignore[attr-defined]
    split = pieces_by_function(table)
    ours = [(key, value) for key, value in table.items() if re.search(OURS, name_of(key))]
    ours.sort(key=lambda item: item[1][2], reverse=True)
    rows = []
    for (filename, line, function), (_, call_count, own, cumulative, _) in ours[:top]:
        short = filename.replace("\\", "/").rsplit("after_response/", 1)[-1]
        piece = next(iter(split((filename, line, function))))
        rows.append(
            (
                f"{short}:{line} {function}",
                call_count / requests,
                own / requests * 1e6,
                cumulative / requests * 1e6,
                piece.partition(":")[0],
            )
        )
    _support.print_table(
        f"The after-response functions that cost the most, {config} (profiled µs per request)",
        ("function", "calls/request", "exclusive µs", "inclusive µs", "piece"),
        rows,
    )


CONFIGS = ("plain", "tracing", "metrics", "no-lifespan")


async def main_async(args: argparse.Namespace) -> None:
    _support.print_machine()
    print(
        f"{args.requests:,} requests with one no-op task each, per configuration; CPU time; "
        f"unprofiled figures are medians of {args.rounds} rounds.\n"
    )
    for config in args.config:
        timings = await unprofiled(config, args.requests, args.rounds)
        stats = await profiled(config, args.requests)
        report(config, stats, args.requests, timings)
        print_top(config, stats, args.requests, args.top)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the unprofiled timing")
    parser.add_argument("--config", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--top", type=int, default=12, help="after-response functions listed")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, numbers meaningless")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.rounds, args.top = 300, 1, 5
    # The no-lifespan configuration warns once; the warning is documented, not news here.
    logging.getLogger("after_response").setLevel(logging.ERROR)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    _support.main_guard(main)
