"""Sustained overload: side effects produced faster than they can complete.

    python benchmarks/overload.py [--duration 10] [--rate 2000] [--smoke]

Requests arrive at ``--rate`` per second for ``--duration`` seconds, each adding one side
effect that carries a ``--payload-kib`` argument and calls a downstream service that takes
10 ms and serves 10 calls at once: 1,000 effects/s, half the offered rate. Each variant runs
in a fresh process (so its memory is its own), in-process: a small "server" starts each
request as its own task, as uvicorn does. RSS is sampled throughout.

after-response (``max_pending=2000``, ``overflow_timeout=1``) should hold memory flat once
its queue is full, shed the excess (each shed task logged and dead-lettered) and account for
every task; Starlette ``BackgroundTasks`` and asgi-background have no bound, so their
backlog and memory grow for as long as the overload lasts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import time
from typing import Any

import _support
import asgi_background
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from after_response import AfterResponseMiddleware

VARIANTS = {
    "after-response": "after-response (max_pending=2000, overflow_timeout=1 s)",
    "starlette": "Starlette BackgroundTasks",
    "asgi-background": "asgi-background",
}
DOWNSTREAM_CONCURRENCY = 10
DOWNSTREAM_SECONDS = 0.01
MAX_PENDING = 2000
OVERFLOW_TIMEOUT = 1.0


class Downstream:
    """A service that answers in 10 ms, 10 calls at a time."""

    def __init__(self) -> None:
        self.slots = asyncio.Semaphore(DOWNSTREAM_CONCURRENCY)
        self.requested = 0
        self.completed = 0
        self.completion = _support.Completion()

    async def call(self, payload: bytearray) -> None:
        async with self.slots:
            await asyncio.sleep(DOWNSTREAM_SECONDS)
        self.completed += 1
        self.completion.tick()


class ShedLog(logging.Handler):
    """Counts the after_response logger's ERROR lines that report a shed task."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.shed_lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        if " shed: " in record.getMessage():
            self.shed_lines += 1


def build(variant: str, downstream: Downstream, dead_letters: list[str]) -> ASGIApp:
    payload_size = ARGS.payload_kib * 1024

    async def signup(request: Request) -> Response:
        payload = bytearray(payload_size)  # the side effect's argument, held until it runs
        downstream.requested += 1
        if variant == "starlette":
            return PlainTextResponse("ok", background=BackgroundTask(downstream.call, payload))
        if variant == "asgi-background":
            await asgi_background.BackgroundTasks(request.scope).add_task(downstream.call, payload)
            return PlainTextResponse("ok")
        request.state.after_response.add(downstream.call, payload)
        return PlainTextResponse("ok")

    app: ASGIApp = Starlette(routes=[Route("/", signup)])
    if variant == "asgi-background":
        return asgi_background.BackgroundTaskMiddleware(app)
    if variant == "after-response":
        return AfterResponseMiddleware(
            app,
            max_pending=MAX_PENDING,
            overflow_timeout=OVERFLOW_TIMEOUT,
            on_dead_letter=lambda letter: dead_letters.append(type(letter.exception).__name__),
        )
    return app


async def child(variant: str) -> dict[str, Any]:
    downstream = Downstream()
    dead_letters: list[str] = []
    shed_log = ShedLog()
    logger = logging.getLogger("after_response")
    logger.addHandler(shed_log)
    logger.propagate = False  # counted, not printed: thousands of lines
    app = build(variant, downstream, dead_letters)
    middleware = app if isinstance(app, AfterResponseMiddleware) else None
    requests: set[asyncio.Task[None]] = set()
    samples: list[dict[str, float]] = []
    loop = asyncio.get_running_loop()
    max_pending_seen = max_running_seen = 0

    def sample(since: float) -> None:
        nonlocal max_pending_seen, max_running_seen
        entry = {
            "t": time.perf_counter() - since,
            "rss_mib": _support.rss_mib(),
            "backlog": downstream.requested - downstream.completed - len(dead_letters),
            "open_requests": len(requests),
        }
        if middleware is not None:
            stats = middleware.stats()
            max_pending_seen = max(max_pending_seen, stats.pending)
            max_running_seen = max(max_running_seen, stats.running)
        samples.append(entry)

    async with _support.lifespan(app):
        begin = time.perf_counter()
        issued = 0
        next_sample = 0.0
        while (elapsed := time.perf_counter() - begin) < ARGS.duration:
            for _ in range(int(elapsed * ARGS.rate) - issued):
                task = loop.create_task(
                    app(_support.http_scope(), _support.receive_request, _support.discard_send)
                )
                requests.add(task)
                task.add_done_callback(requests.discard)
                issued += 1
            if elapsed >= next_sample:
                sample(begin)
                next_sample += ARGS.sample_interval
            await asyncio.sleep(0.001)
        sample(begin)
        load_end_rss = _support.rss_mib()
        backlog_at_end = downstream.requested - downstream.completed - len(dead_letters)
        # The backlog drains: request calls end, then queued effects run.
        drain_started = time.perf_counter()
        if requests:
            await asyncio.wait(list(requests), timeout=ARGS.drain_timeout)
        if middleware is not None:
            drained = await middleware.drain(ARGS.drain_timeout)
        else:
            downstream.completion.expect(downstream.requested - downstream.completed)
            drained = await downstream.completion.wait(ARGS.drain_timeout)
        drain_seconds = time.perf_counter() - drain_started
        sample(begin)
    result: dict[str, Any] = {
        "variant": variant,
        "issued": issued,
        "requested": downstream.requested,
        "completed": downstream.completed,
        "backlog_at_end_of_load": backlog_at_end,
        "load_end_rss_mib": load_end_rss,
        "peak_rss_mib": _support.peak_rss_mib(),
        "drained": drained,
        "drain_seconds": drain_seconds,
        "samples": samples,
        "dead_letters": len(dead_letters),
        "shed_log_lines": shed_log.shed_lines,
    }
    if middleware is not None:
        result["stats"] = middleware.stats().__dict__
        result["max_pending_seen"] = max_pending_seen
        result["max_running_seen"] = max_running_seen
    return result


def rss_at(samples: list[dict[str, float]], fraction: float, duration: float) -> float:
    """RSS of the last sample taken at or before ``fraction`` of the load."""
    moment = fraction * duration
    eligible = [s for s in samples if s["t"] <= moment]
    return (eligible[-1] if eligible else samples[0])["rss_mib"]


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> bool:
    rows = []
    for result in results:
        samples = result["samples"]
        start = samples[0]["rss_mib"]
        quarter, half = rss_at(samples, 0.25, args.duration), rss_at(samples, 0.5, args.duration)
        three_quarters = rss_at(samples, 0.75, args.duration)
        end = result["load_end_rss_mib"]
        rows.append(
            (
                VARIANTS[result["variant"]],
                start,
                quarter,
                half,
                three_quarters,
                end,
                end - half,
                result["backlog_at_end_of_load"],
                result["drain_seconds"],
                f"{result['completed']:,} / {result['requested']:,}",
                result["dead_letters"],
            )
        )
    _support.print_table(
        f"RSS (MiB) during {args.duration:g} s of overload: {args.rate:,} effects/s offered, "
        f"{DOWNSTREAM_CONCURRENCY / DOWNSTREAM_SECONDS:,.0f}/s served, "
        f"{args.payload_kib} KiB argument each",
        (
            "variant",
            "start",
            "25%",
            "50%",
            "75%",
            "end",
            "growth 2nd half",
            "backlog at end",
            "drain s",
            "completed / requested",
            "shed",
        ),
        rows,
    )
    ours = next(r for r in results if r["variant"] == "after-response")
    stats = ours["stats"]
    terminal = sum(
        stats[key] for key in ("succeeded", "failed", "timed_out", "discarded", "shed", "abandoned")
    )
    _support.print_table(
        "after-response accounting after the drain",
        (
            "added",
            "succeeded",
            "shed",
            "failed+timed_out+discarded+abandoned",
            "collected+pending+running",
            "shed log lines",
            "dead letters",
            "max pending seen",
            "max running seen",
        ),
        [
            (
                stats["added"],
                stats["succeeded"],
                stats["shed"],
                stats["failed"] + stats["timed_out"] + stats["discarded"] + stats["abandoned"],
                stats["collected"] + stats["pending"] + stats["running"],
                ours["shed_log_lines"],
                ours["dead_letters"],
                ours["max_pending_seen"],
                ours["max_running_seen"],
            )
        ],
    )
    half = rss_at(ours["samples"], 0.5, args.duration)
    growth = ours["load_end_rss_mib"] - half
    peer_growth = [
        r["load_end_rss_mib"] - rss_at(r["samples"], 0.5, args.duration)
        for r in results
        if r is not ours
    ]
    accounted = stats["added"] == terminal == ours["requested"]
    judge = not args.smoke
    _support.print_targets(
        [
            (
                "after-response RSS flat in the second half of the overload (growth ≤ 2 MiB; "
                "the unbounded peers grow " + ", ".join(f"{g:.0f}" for g in peer_growth) + " MiB)",
                f"{growth:+.1f} MiB",
                growth <= 2 if judge else None,
            ),
            (
                f"pending never above max_pending={MAX_PENDING}",
                f"max {ours['max_pending_seen']:,}",
                ours["max_pending_seen"] <= MAX_PENDING,
            ),
            (
                "every shed task logged and dead-lettered",
                f"shed {stats['shed']:,}, log lines {ours['shed_log_lines']:,}, "
                f"dead letters {ours['dead_letters']:,}",
                stats["shed"] == ours["shed_log_lines"] == ours["dead_letters"]
                and (stats["shed"] > 0 or not judge),
            ),
            (
                "added == succeeded+failed+timed_out+discarded+shed+abandoned after drain",
                f"{stats['added']:,} == {terminal:,}",
                accounted and ours["drained"],
            ),
        ]
    )
    return accounted and ours["drained"]


ARGS: argparse.Namespace


def main() -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds of overload")
    parser.add_argument("--rate", type=int, default=2000, help="requests (effects) per second")
    parser.add_argument("--payload-kib", type=int, default=4, help="argument size per effect")
    parser.add_argument("--sample-interval", type=float, default=0.25, help="seconds")
    parser.add_argument("--drain-timeout", type=float, default=120, help="seconds")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--json", help="also write the samples to this file")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="a few seconds, numbers meaningless")
    args = ARGS = parser.parse_args()
    if args.smoke:
        args.duration, args.rate = 1.0, 1500
    if args.child:
        print(json.dumps(asyncio.run(child(args.child))))
        return 0

    forwarded = [
        f"--duration={args.duration}",
        f"--rate={args.rate}",
        f"--payload-kib={args.payload_kib}",
        f"--sample-interval={args.sample_interval}",
        f"--drain-timeout={args.drain_timeout}",
    ]
    results = []
    for variant in dict.fromkeys(["after-response", *args.variants]):
        completed = subprocess.run(
            [sys.executable, __file__, "--child", variant, *forwarded],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    _support.print_machine()
    ok = report(results, args)
    if args.json:
        with open(args.json, "w") as output:
            json.dump(results, output, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    _support.main_guard(main)
