"""The apps ``engines.py`` measures: a Celery app and a taskiq broker, each with its engine,
and the web app that hands side effects to one of them.

The workers import this module (``celery -A engines_app worker``, ``taskiq worker
engines_app:broker``, run from ``benchmarks/``), so the side effect ``tick`` is found by its
name, ``engines_app:tick``, in both processes. Every run of ``tick`` counts itself in Redis
(``INCR``), under the phase's counter: the benchmark checks that every task it handed off ran.

Environment: ``ENGINES_BENCH_REDIS_URL``, the broker (required).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import redis
from celery import Celery
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from taskiq_redis import RedisStreamBroker

from after_response import AfterResponseMiddleware, SQLiteStore, side_effect
from after_response.celery import CeleryEngine
from after_response.taskiq import TaskiqEngine

REDIS_URL_ENV = "ENGINES_BENCH_REDIS_URL"
COUNTER_PREFIX = "engines-bench:ran:"
DIRECT_TASK = "engines_bench.tick_direct"


def _redis_url() -> str:
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        raise RuntimeError(f"{REDIS_URL_ENV} is not set: engines.py sets it for its processes")
    return url


celery_app = Celery("engines_bench", broker=_redis_url())
celery_app.conf.update(
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
)
celery_engine = CeleryEngine(celery_app)

broker = RedisStreamBroker(_redis_url(), unacknowledged_lock_timeout=30)
taskiq_engine = TaskiqEngine(broker)

_clients: dict[int, redis.Redis] = {}
_clients_lock = threading.Lock()


def _client() -> redis.Redis:
    """This process's Redis client (a forked worker child makes its own)."""
    with _clients_lock:
        client = _clients.get(os.getpid())
        if client is None:
            client = _clients[os.getpid()] = redis.Redis.from_url(_redis_url())
        return client


def ran(counter: str) -> int:
    """How many ticks counted under ``counter`` have run."""
    return int(_client().get(COUNTER_PREFIX + counter) or 0)


@side_effect(durable=True)
def tick(seq: int, counter: str) -> None:
    """The side effect handed off: count one run under ``counter`` (``seq`` identifies the
    request, for the publish lag)."""
    _client().incr(COUNTER_PREFIX + counter)


@celery_app.task(name=DIRECT_TASK, ignore_result=True)
def tick_celery(seq: int, counter: str) -> None:
    """``tick`` as a plain Celery task, for the handler that calls ``.delay()`` itself."""
    _client().incr(COUNTER_PREFIX + counter)


@broker.task(task_name=DIRECT_TASK)
async def tick_taskiq(seq: int, counter: str) -> None:
    """``tick`` as a plain taskiq task, for the handler that calls ``.kiq()`` itself."""
    _client().incr(COUNTER_PREFIX + counter)


def _seq(request: Request) -> int:
    return int(request.query_params.get("seq", "0"))


async def handoff(request: Request) -> PlainTextResponse:
    """``n`` durable ticks through the outbox (``?n=...&seq=...&counter=...``)."""
    seq, counter = _seq(request), request.query_params.get("counter", "handoff")
    after = request.state.after_response
    for _ in range(int(request.query_params.get("n", "1"))):
        after.add(tick, seq, counter)
    return PlainTextResponse("ok")


async def direct_celery(request: Request) -> PlainTextResponse:
    """What a handler does without after-response: ``.delay()`` (a blocking call to Redis)."""
    tick_celery.delay(_seq(request), "direct")
    return PlainTextResponse("ok")


async def direct_taskiq(request: Request) -> PlainTextResponse:
    """What a handler does without after-response: ``await .kiq()``."""
    await tick_taskiq.kiq(_seq(request), "direct")
    return PlainTextResponse("ok")


def create_app(engine: str, db: str, synchronous: str = "FULL") -> AfterResponseMiddleware:
    """The web app with a store (``synchronous`` FULL or NORMAL) and the ``engine``
    (``"celery"`` or ``"taskiq"``)."""
    routes = [
        Route("/handoff", handoff, methods=["POST"]),
        Route("/direct", direct_celery if engine == "celery" else direct_taskiq, methods=["POST"]),
    ]
    chosen: Any = celery_engine if engine == "celery" else taskiq_engine
    store = SQLiteStore(db, synchronous=synchronous)
    return AfterResponseMiddleware(Starlette(routes=routes), store=store, engine=chosen)
