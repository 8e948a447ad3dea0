"""The checkout app that ``durable.py`` serves under uvicorn, one variant per server process,
and the side effect it runs (importable by name, so a durable task can be stored).

    python benchmarks/durable_app.py VARIANT --fd FD [--db PATH] [--synchronous FULL]
                                     [--broker URL] [--effect-seconds 0]

``POST /checkout?n=N`` reads a JSON body and hands ``send_receipt`` N times to:

- ``memory``: after-response, in memory (the baseline);
- ``durable``: after-response with ``durable=True`` and a ``SQLiteStore`` at ``--db``;
- ``celery``: a Celery task's ``.delay()``, published to the Redis broker at ``--broker``
  (nothing consumes it: this measures publishing, the part a request waits for), called in
  the ``async def`` handler, as most code does (it blocks the event loop meanwhile);
- ``celery-thread``: the same calls in a worker thread, as a ``def`` endpoint makes them.

``POST /bench/drain`` waits for the side effects added so far and returns the counts: runs,
recovered runs, the ``time.monotonic()`` of the first recovered run (comparable across
processes on Linux), Celery publishes and the middleware's ``stats()``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from after_response import AfterResponseMiddleware, SQLiteStore, current_task

VARIANTS = ("memory", "durable", "celery", "celery-thread")


class Counts:
    """What this process's side effects did."""

    def __init__(self) -> None:
        self.runs = 0
        self.recovered = 0
        self.first_recovered_at: float | None = None
        self.published = 0


COUNTS = Counts()
ORDERS = itertools.count(1)
PUBLISHED_LOCK = threading.Lock()
PUBLISHING: set[asyncio.Future[None]] = set()


async def send_receipt(to: str, order: int, seconds: float = 0.0) -> None:
    """The side effect: a receipt for ``order`` (a no-op, or ``seconds`` of waiting)."""
    if seconds:
        await asyncio.sleep(seconds)
    COUNTS.runs += 1
    if current_task().recovered:
        COUNTS.recovered += 1
        if COUNTS.first_recovered_at is None:
            COUNTS.first_recovered_at = time.monotonic()


def celery_publisher(broker: str) -> Any:
    """The Celery task the ``celery`` variant publishes (imported only there)."""
    from celery import Celery  # type: ignore[import-untyped]

    celery = Celery("durable_app", broker=broker)
    celery.conf.update(task_ignore_result=True)

    def send_receipt_task(to: str, order: int) -> None:  # never consumed: no worker runs
        pass

    return celery.task(name="durable_app.send_receipt")(send_receipt_task)


def _publish_all(publish: Any, to: str, orders: list[int]) -> None:
    for order in orders:
        publish(to, order)
        with PUBLISHED_LOCK:  # from worker threads too
            COUNTS.published += 1


def build_app(args: argparse.Namespace) -> ASGIApp:
    middleware: AfterResponseMiddleware | None = None
    publish = celery_publisher(args.broker).delay if args.variant.startswith("celery") else None
    in_thread = args.variant == "celery-thread"
    durable = args.variant == "durable"

    async def checkout(request: Request) -> Response:
        body = await request.json()
        to = body["email"]
        count = int(request.query_params.get("n", "1"))
        if publish is not None:
            orders = [next(ORDERS) for _ in range(count)]
            if in_thread:
                publishing = asyncio.ensure_future(
                    run_in_threadpool(_publish_all, publish, to, orders)
                )
                PUBLISHING.add(publishing)
                publishing.add_done_callback(PUBLISHING.discard)
                # A request whose client left is cancelled, but its thread goes on publishing:
                # shielded, the drain can wait for it.
                await asyncio.shield(publishing)
            else:
                _publish_all(publish, to, orders)
            return JSONResponse({"message": "Receipt on its way"})
        adder = request.state.after_response
        if durable:
            adder = adder.options(durable=True)
        for _ in range(count):
            adder.add(send_receipt, to, next(ORDERS), args.effect_seconds)
        return JSONResponse({"message": "Receipt on its way"})

    async def ready(request: Request) -> Response:
        return PlainTextResponse("ready")

    async def drain(request: Request) -> Response:
        timeout = float(request.query_params.get("timeout", "60"))
        result: dict[str, Any] = {"settled": True}
        if PUBLISHING:
            await asyncio.wait(PUBLISHING, timeout=timeout)
        if middleware is not None:
            result["settled"] = await middleware.drain(timeout)
            result["stats"] = middleware.stats().__dict__
        if args.store is not None:
            await args.store.flush()  # the last marks committed: "stored, run, marked done"
            result["rows"] = args.store.count_by_state()
        result.update(COUNTS.__dict__)
        return Response(json.dumps(result), media_type="application/json")

    app: ASGIApp = Starlette(
        routes=[
            Route("/checkout", checkout, methods=["POST"]),
            Route("/bench/ready", ready),
            Route("/bench/drain", drain, methods=["POST"]),
        ]
    )
    if publish is None:
        app = middleware = AfterResponseMiddleware(
            app,
            max_concurrency=args.max_concurrency,
            max_pending=args.max_pending,
            store=args.store,
        )
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--fd", type=int, required=True, help="a listening TCP socket")
    parser.add_argument("--db", help="the SQLite file (durable)")
    parser.add_argument("--synchronous", default="FULL", choices=("FULL", "NORMAL"))
    parser.add_argument("--owner-timeout", type=float, default=30.0)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/0", help="celery")
    parser.add_argument("--effect-seconds", type=float, default=0.0)
    parser.add_argument("--max-concurrency", type=int, default=100)
    parser.add_argument("--max-pending", type=int, default=100_000)
    args = parser.parse_args()
    args.store = None
    if args.variant == "durable":
        if not args.db:
            parser.error("the durable variant needs --db PATH")
        args.store = SQLiteStore(
            args.db,
            synchronous=args.synchronous,
            heartbeat_interval=args.owner_timeout / 4,
            owner_timeout=args.owner_timeout,
        )
    config = uvicorn.Config(
        build_app(args),
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    # socket.socket(fileno=...) keeps the socket's real family (see load_app.py).
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=args.fd)])


if __name__ == "__main__":
    # Run from the module imported by its name, not from ``__main__``: a durable task is
    # stored as "durable_app:send_receipt", which a restarted process must find again.
    import durable_app

    durable_app.main()
