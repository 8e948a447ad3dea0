"""The app that ``fairness.py`` serves under uvicorn (default settings), one per server process.

    python benchmarks/fairness_app.py --fd FD [--effects 50] [--overflow shed]

- ``POST /flood`` adds ``--effects`` side effects of ``await asyncio.sleep(0.010)`` each
  (``--effects 0``: the control, a request that adds nothing);
- ``GET /health`` adds nothing (the probe's endpoint);
- ``GET /bench/stats`` returns ``middleware.stats()``, the lines the ``after_response`` logger
  wrote, and the server's monotonic clock (comparable across processes on Linux);
- ``POST /bench/drain?timeout=S`` waits for every side effect added so far to end;
- ``POST /bench/profile/start`` and ``/bench/profile/stop?top=N`` run cProfile on the event
  loop's thread between the two calls and return where the time went.

Logging is what an app without a logging config gets (Python's last-resort handler: WARNING
and up, to stderr), made explicit so that the ``after_response`` lines can be counted.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import pstats
import socket
import sys
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from after_response import AfterResponseMiddleware

EFFECT_SECONDS = 0.010

#: Self time is grouped by where the function lives: (group, substring of its file name).
GROUPS = (
    ("after_response", "/after_response/"),
    ("logging", "/logging/"),
    ("opentelemetry", "/opentelemetry/"),
    ("uvicorn", "/uvicorn/"),
    ("h11", "/h11/"),
    ("starlette", "/starlette/"),
    ("anyio", "/anyio/"),
    ("asyncio", "/asyncio/"),
    ("benchmark app", "fairness_app.py"),
)
IDLE = "<method 'poll' of 'select.epoll' objects>"


async def side_effect() -> None:
    """A 10 ms I/O-bound side effect."""
    await asyncio.sleep(EFFECT_SECONDS)


class LineCounter(logging.Filter):
    """Counts the records of the ``after_response`` logger that its handler writes, by level."""

    def __init__(self) -> None:
        super().__init__()
        self.by_level: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("after_response"):
            self.by_level[record.levelname] = self.by_level.get(record.levelname, 0) + 1
        return True


def build_app(
    effects: int, overflow: str, lines: LineCounter, max_concurrency: int | None
) -> AfterResponseMiddleware:
    profiler: cProfile.Profile | None = None

    async def flood(request: Request) -> Response:
        collector = request.state.after_response
        for _ in range(effects):
            collector.add(side_effect)
        return PlainTextResponse("ok")

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    def snapshot() -> dict[str, Any]:
        return {
            "time": time.monotonic(),
            "stats": middleware.stats().__dict__,
            "log_lines": dict(lines.by_level),
        }

    async def stats(request: Request) -> Response:
        return Response(json.dumps(snapshot()), media_type="application/json")

    async def drain(request: Request) -> Response:
        drained = await middleware.drain(float(request.query_params.get("timeout", "60")))
        return Response(
            json.dumps({"drained": drained, **snapshot()}), media_type="application/json"
        )

    async def profile_start(request: Request) -> Response:
        nonlocal profiler
        profiler = cProfile.Profile()
        profiler.enable()
        return Response(json.dumps({"profiling": True}), media_type="application/json")

    async def profile_stop(request: Request) -> Response:
        if profiler is None:
            return PlainTextResponse("not profiling", status_code=409)
        profiler.disable()
        top = int(request.query_params.get("top", "15"))
        return Response(json.dumps(profile_report(profiler, top)), media_type="application/json")

    app = Starlette(
        routes=[
            Route("/flood", flood, methods=["POST"]),
            Route("/health", health),
            Route("/bench/stats", stats),
            Route("/bench/drain", drain, methods=["POST"]),
            Route("/bench/profile/start", profile_start, methods=["POST"]),
            Route("/bench/profile/stop", profile_stop, methods=["POST"]),
        ]
    )
    options: dict[str, Any] = {}  # every default, unless told
    if overflow == "backpressure":
        options.update(overflow=overflow, exempt_paths=("/health",))
    if max_concurrency is not None:
        options.update(max_concurrency=max_concurrency)
    middleware = AfterResponseMiddleware(app, **options)
    return middleware


def profile_report(profiler: cProfile.Profile, top: int) -> dict[str, Any]:
    """Self time per group, and the after_response and logging functions by cumulative time."""
    entries = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    groups: dict[str, float] = {}
    functions: list[dict[str, Any]] = []
    total = 0.0
    for (filename, line, name), (_, calls, tottime, cumtime, _callers) in entries.items():
        total += tottime
        if filename == "~":
            group = "idle (waiting in epoll)" if name == IDLE else "C functions and builtins"
        else:
            group = next((g for g, part in GROUPS if part in filename), "other Python")
        groups[group] = groups.get(group, 0.0) + tottime
        module = filename.rsplit("/", 1)[-1]
        functions.append(
            {
                "group": group,
                "function": name if filename == "~" else f"{module}:{line}({name})",
                "calls": calls,
                "tottime": tottime,
                "cumtime": cumtime,
            }
        )
    by_self = sorted(functions, key=lambda row: row["tottime"], reverse=True)
    functions.sort(key=lambda row: row["cumtime"], reverse=True)
    iterations = sum(f["calls"] for f in functions if f["function"].endswith("(_run_once)"))
    return {
        "total": total,
        "loop_iterations": iterations,
        "groups": groups,
        "self": by_self[:top],
        "after_response": [f for f in functions if f["group"] == "after_response"][:top],
        "logging": [f for f in functions if f["group"] == "logging"][:top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fd", type=int, required=True, help="a listening TCP socket")
    parser.add_argument("--effects", type=int, default=50, help="side effects per /flood")
    parser.add_argument("--overflow", default="shed", choices=("shed", "backpressure"))
    parser.add_argument("--max-concurrency", type=int, help="default: the middleware's own")
    args = parser.parse_args()
    lines = LineCounter()
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.addFilter(lines)
    logging.getLogger().addHandler(handler)
    config = uvicorn.Config(build_app(args.effects, args.overflow, lines, args.max_concurrency))
    # socket.socket(fileno=...) keeps the socket's real family (uvicorn's own --fd assumes a
    # Unix socket).
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=args.fd)])


if __name__ == "__main__":
    main()
