"""The login app that ``load.py`` serves, one variant per server process, on one of three
server stacks.

    python benchmarks/load_app.py VARIANT --stack STACK (--fd FD | --port PORT)
        [--max-concurrency N] [--max-pending N]

Stacks: ``uvicorn-h11`` (uvicorn's pure-Python h11 parser on the asyncio loop),
``uvicorn-uvloop`` (``uvicorn[standard]``: httptools on uvloop) and ``granian`` (its Rust
HTTP runtime, one worker, the event loop it picks by default). Uvicorn serves the
listening socket ``--fd``; granian binds ``--port`` itself.

``POST /login`` reads a JSON body and has four side effects of 50 ms each (``asyncio.sleep``,
standing in for an SMTP send, an analytics beacon, a CRM sync and a webhook). The variants
differ only in how the side effects are run:

- ``none``: no side effects (the ceiling);
- ``awaited``: awaited in the handler, one after the other (the naive way);
- ``starlette``: Starlette ``BackgroundTasks`` (run after the response, one after the other);
- ``asgi-background``: ``asgi_background.BackgroundTasks`` (run concurrently after the call);
- ``after-response``: ``AfterResponseMiddleware`` (concurrent, bounded, after the response);
- ``after-response-idle``: the middleware installed, no side effects (its cost per request).

An outermost recorder notes, for each login, when its response was sent (the final body
``send`` returned) and when its last side effect finished. ``POST /bench/drain`` waits until
every side effect requested so far has finished (or was reported lost) and returns the
counts, the per-request delays and the process's peak RSS; ``POST /bench/reset`` starts a
fresh ledger; ``GET /bench/ready`` names the event loop the app runs on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time
from typing import Any

import _support
import asgi_background
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTasks
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from after_response import AfterResponseMiddleware, DeadLetter

VARIANTS = (
    "none",
    "awaited",
    "starlette",
    "asgi-background",
    "after-response",
    "after-response-idle",
)
#: Server stacks: how each runs the app (uvicorn's loop and HTTP parser; granian).
UVICORN_STACKS = {"uvicorn-h11": ("asyncio", "h11"), "uvicorn-uvloop": ("uvloop", "httptools")}
STACKS = (*UVICORN_STACKS, "granian")
EFFECTS_PER_LOGIN = 4
EFFECT_SECONDS = 0.05


class Record:
    """One login: when its response was sent, and how many of its side effects remain."""

    __slots__ = ("last_done", "remaining", "sent")

    def __init__(self) -> None:
        self.sent = 0.0
        self.last_done = 0.0
        self.remaining = 0


class Ledger:
    """Side effects requested, completed and lost, and response-to-last-effect delays."""

    def __init__(self) -> None:
        self.requested = 0
        self.completed = 0
        self.lost = 0
        self.logins = 0
        #: Seconds from a login's response being sent to its last side effect finishing
        #: (negative: the side effects were done before the response was sent).
        self.delays: list[float] = []
        self._settled = asyncio.Event()
        self._settled.set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def outstanding(self) -> int:
        return self.requested - self.completed - self.lost

    def requesting(self, record: Record) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self.requested += 1
        record.remaining += 1
        self._settled.clear()

    def effect_done(self, record: Record) -> None:
        self.completed += 1
        record.remaining -= 1
        if record.remaining == 0:
            record.last_done = time.perf_counter()
            if record.sent:
                self.delays.append(record.last_done - record.sent)
        self._check_settled()

    def effect_lost(self, letter: DeadLetter) -> None:
        """``on_dead_letter``, in the hook's own thread: a side effect that will never
        complete (shed, abandoned...), counted on the loop."""
        assert self._loop is not None, "a side effect was lost before any was requested"
        self._loop.call_soon_threadsafe(self._lost)

    def _lost(self) -> None:
        self.lost += 1
        self._check_settled()

    def response_sent(self, record: Record) -> None:
        self.logins += 1
        record.sent = time.perf_counter()
        if record.last_done:
            self.delays.append(record.last_done - record.sent)

    def _check_settled(self) -> None:
        if self.outstanding == 0:
            self._settled.set()

    async def settled(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._settled.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


LEDGER = Ledger()


async def side_effect(record: Record) -> None:
    """A 50 ms I/O-bound side effect (an SMTP send, say)."""
    await asyncio.sleep(EFFECT_SECONDS)
    LEDGER.effect_done(record)


class Recorder:
    """Outermost: notes when each login's response has been sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/login":
            await self.app(scope, receive, send)
            return
        record = scope["bench.record"] = Record()

        async def send_recording(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                LEDGER.response_sent(record)

        await self.app(scope, receive, send_recording)


def login_endpoint(variant: str) -> Any:
    async def login(request: Request) -> Response:
        credentials = await request.json()
        record: Record = request.scope["bench.record"]
        body = {"message": "Code sent", "to": credentials.get("email")}
        if variant in ("none", "after-response-idle"):
            return JSONResponse(body)
        if variant == "awaited":
            # All four requested up front, as in the other variants: counted one at a time,
            # the ledger would look settled between two effects of a login still running.
            for _ in range(EFFECTS_PER_LOGIN):
                LEDGER.requesting(record)
            for _ in range(EFFECTS_PER_LOGIN):
                await side_effect(record)
            return JSONResponse(body)
        if variant == "starlette":
            tasks = BackgroundTasks()
            for _ in range(EFFECTS_PER_LOGIN):
                LEDGER.requesting(record)
                tasks.add_task(side_effect, record)
            return JSONResponse(body, background=tasks)
        if variant == "asgi-background":
            background = asgi_background.BackgroundTasks(request.scope)
            for _ in range(EFFECTS_PER_LOGIN):
                LEDGER.requesting(record)
                await background.add_task(side_effect, record)
            return JSONResponse(body)
        collector = request.state.after_response
        for _ in range(EFFECTS_PER_LOGIN):
            LEDGER.requesting(record)
            collector.add(side_effect, record)
        return JSONResponse(body)

    return login


def build_app(variant: str, max_concurrency: int, max_pending: int) -> ASGIApp:
    middleware: AfterResponseMiddleware | None = None

    async def ready(request: Request) -> Response:
        loop = type(asyncio.get_running_loop())
        return JSONResponse({"loop": f"{loop.__module__}.{loop.__qualname__}"})

    async def drain(request: Request) -> Response:
        timeout = float(request.query_params.get("timeout", "60"))
        # Called as the load stops: what the executor holds then shows whether it ran at
        # its bounds (max_concurrency running, pending filling up).
        at_end = middleware.stats().__dict__ if middleware is not None else None
        settled = await LEDGER.settled(timeout)
        result: dict[str, Any] = {
            "settled": settled,
            "logins": LEDGER.logins,
            "requested": LEDGER.requested,
            "completed": LEDGER.completed,
            "lost": LEDGER.lost,
            "delays": LEDGER.delays,
            # From the process that runs the app (granian's is a worker of its own).
            "peak_rss_mib": _support.peak_rss_mib(),
        }
        if middleware is not None:
            await middleware.drain(timeout)
            result["stats"] = middleware.stats().__dict__
            result["stats_at_end_of_load"] = at_end
        return Response(json.dumps(result), media_type="application/json")

    async def reset(request: Request) -> Response:
        global LEDGER
        LEDGER = Ledger()
        return PlainTextResponse("reset")

    app: ASGIApp = Starlette(
        routes=[
            Route("/login", login_endpoint(variant), methods=["POST"]),
            Route("/bench/ready", ready),
            Route("/bench/drain", drain, methods=["POST"]),
            Route("/bench/reset", reset, methods=["POST"]),
        ]
    )
    if variant == "asgi-background":
        app = asgi_background.BackgroundTaskMiddleware(app)
    elif variant.startswith("after-response"):
        app = middleware = AfterResponseMiddleware(
            app,
            max_concurrency=max_concurrency,
            max_pending=max_pending,
            on_dead_letter=lambda letter: LEDGER.effect_lost(letter),
        )
    return Recorder(app)


def app_from_environment() -> ASGIApp:
    """The app for granian, which imports it in its worker: the options come from the
    environment ``main()`` sets."""
    return build_app(
        os.environ["LOAD_APP_VARIANT"],
        int(os.environ["LOAD_APP_MAX_CONCURRENCY"]),
        int(os.environ["LOAD_APP_MAX_PENDING"]),
    )


def serve_granian(port: int) -> None:
    from granian import Granian
    from granian.constants import Interfaces
    from granian.log import LogLevels

    Granian(
        "load_app:app_from_environment",
        factory=True,
        address="127.0.0.1",
        port=port,
        interface=Interfaces.ASGI,
        workers=1,
        log_level=LogLevels.warning,
        working_dir=_support.BENCHMARKS_DIR,
    ).serve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--stack", choices=STACKS, default="uvicorn-h11")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, help="a listening TCP socket (uvicorn)")
    where.add_argument("--port", type=int, help="a free port on 127.0.0.1 (granian)")
    parser.add_argument("--max-concurrency", type=int, default=100)
    parser.add_argument("--max-pending", type=int, default=10_000)
    args = parser.parse_args()
    if args.stack == "granian":
        if args.port is None:
            parser.error("granian binds its own socket: pass --port, not --fd")
        os.environ["LOAD_APP_VARIANT"] = args.variant
        os.environ["LOAD_APP_MAX_CONCURRENCY"] = str(args.max_concurrency)
        os.environ["LOAD_APP_MAX_PENDING"] = str(args.max_pending)
        serve_granian(args.port)
        return
    if args.fd is None:
        parser.error("uvicorn serves a listening socket: pass --fd, not --port")
    loop, http = UVICORN_STACKS[args.stack]
    config = uvicorn.Config(
        build_app(args.variant, args.max_concurrency, args.max_pending),
        loop=loop,
        http=http,
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    # socket.socket(fileno=...) keeps the socket's real family (uvicorn's own --fd assumes a
    # Unix socket, which would leave TCP_NODELAY off).
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=args.fd)])


if __name__ == "__main__":
    main()
