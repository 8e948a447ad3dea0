"""An app for the server-exit tests, served in a subprocess by uvicorn, hypercorn or granian.

Configured through environment variables (a server's CLI passes nothing else through):

- ``EXIT_APP_MODE``: what ``GET /start`` adds: ``ignore-cancel`` (async tasks that catch
  ``CancelledError`` and keep running), ``blocking`` (sync tasks that ``time.sleep(60)``
  in worker threads) or ``stuck-hook`` (async tasks that fail at once, with an
  ``on_dead_letter`` hook that never returns from the first dead letter);
- ``EXIT_APP_TASKS``: how many tasks ``GET /start`` adds;
- ``EXIT_APP_SHUTDOWN_TIMEOUT``: the middleware's ``shutdown_timeout``;
- ``EXIT_APP_STORE``: if set, the path of the middleware's durable ``SQLiteStore``;
- ``EXIT_APP_CELERY``: if set, the middleware hands durable side effects to a ``CeleryEngine``
  whose Celery app (broker never reached) has this JSON as its ``task_annotations``;
- ``EXIT_APP_WRAPPED``: ``starlette`` (the default: a Starlette app with a lifespan of its
  own) or ``no-lifespan`` (the same app behind one that raises on the lifespan scope, as
  Django's ASGI handler does).

``GET /health`` answers ``ok``; ``GET /stats`` answers ``middleware.stats()`` as JSON. The
app's own lifespan shutdown prints :data:`SHUTDOWN_MARKER` to stdout; the ``after_response``
logger writes to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from after_response import AfterResponseMiddleware, DeadLetter, SQLiteStore

SHUTDOWN_MARKER = "exit-app: the app's own shutdown ran"
IGNORE_CANCEL_NAME = "ignores_cancellation"
BLOCKING_NAME = "blocks_its_thread"
FAILING_NAME = "fails_at_once"

MODE = os.environ.get("EXIT_APP_MODE", "ignore-cancel")
TASKS = int(os.environ.get("EXIT_APP_TASKS", "1"))
SHUTDOWN_TIMEOUT = float(os.environ.get("EXIT_APP_SHUTDOWN_TIMEOUT", "0.5"))
STORE = os.environ.get("EXIT_APP_STORE")
CELERY_ANNOTATIONS = os.environ.get("EXIT_APP_CELERY")
WRAPPED = os.environ.get("EXIT_APP_WRAPPED", "starlette")

_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
logging.getLogger("after_response").addHandler(_handler)
logging.getLogger("after_response").setLevel(logging.INFO)


async def ignores_cancellation() -> None:
    """Catches every cancellation and carries on, for longer than any test waits."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(60)


def blocks_its_thread() -> None:
    """Blocks its worker thread; nothing can interrupt it."""
    time.sleep(60)


async def fails_at_once() -> None:
    raise ConnectionError("the downstream is down")


def stuck_hook(letter: DeadLetter) -> None:
    """Never returns (within any test): the dead letters after the first stay queued."""
    threading.Event().wait(60)


EFFECTS = {
    "ignore-cancel": (ignores_cancellation, IGNORE_CANCEL_NAME),
    "blocking": (blocks_its_thread, BLOCKING_NAME),
    "stuck-hook": (fails_at_once, FAILING_NAME),
}


async def start(request: Request) -> PlainTextResponse:
    effect, name = EFFECTS[MODE]
    for _ in range(TASKS):
        request.state.after_response.options(name=name, timeout=None).add(effect)
    return PlainTextResponse("started")


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def stats(request: Request) -> JSONResponse:
    return JSONResponse(dataclasses.asdict(app.stats()))


@contextlib.asynccontextmanager
async def lifespan(_: Starlette) -> AsyncIterator[None]:
    yield
    print(SHUTDOWN_MARKER, flush=True)


starlette_app = Starlette(
    routes=[Route("/start", start), Route("/health", health), Route("/stats", stats)],
    lifespan=lifespan,
)


async def without_lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        raise RuntimeError("this app does not support the lifespan protocol")
    await starlette_app(scope, receive, send)


def celery_engine(annotations: str) -> Any:
    from celery import Celery

    from after_response.celery import CeleryEngine

    celery = Celery("exit_app", broker="redis://127.0.0.1:1/0")
    celery.conf.task_annotations = json.loads(annotations)
    return CeleryEngine(celery)


app = AfterResponseMiddleware(
    starlette_app if WRAPPED == "starlette" else without_lifespan,
    shutdown_timeout=SHUTDOWN_TIMEOUT,
    max_threads=max(TASKS, 1),
    on_dead_letter=stuck_hook if MODE == "stuck-hook" else None,
    store=None if STORE is None else SQLiteStore(STORE),
    engine=None if CELERY_ANNOTATIONS is None else celery_engine(CELERY_ANNOTATIONS),
)
