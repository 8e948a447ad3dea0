"""The web app of the engine contract suite, run under ``uvicorn`` in a process of its own and
configured by environment variables (a server process cannot be handed objects):

- ``AFTER_RESPONSE_TEST_ENGINE``: ``celery`` or ``taskiq``: whose engine durable tasks go to
  (the same module the worker imports builds it, so the runner task is registered here too).
- ``AFTER_RESPONSE_TEST_BROKER_URL``, ``AFTER_RESPONSE_TEST_LEDGER``: as for the workers.
- ``AR_TEST_DB``: the SQLite store (the outbox), shared by every web process of a test.
- ``AFTER_RESPONSE_TEST_SPANS``: if set, spans go there (JSON lines), and OpenTelemetry's ASGI
  middleware gives each request a server span.

Routes: ``POST /purchase?order=K[&gate=PATH]`` adds the durable ``record_effect("order-K")``
(handed to the engine) and the plain ``arecord_effect("local-K")`` (run here);
``GET /stats`` answers the middleware's counts and the process id.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from after_response import AfterResponseMiddleware, SQLiteStore
from tests.engine_apps import required_environment, spans
from tests.engine_apps.effects import arecord_effect, record_effect

ENGINE_ENV = "AFTER_RESPONSE_TEST_ENGINE"
ENGINE_MODULES = {
    "celery": "tests.engine_apps.celery_engine_app",
    "taskiq": "tests.engine_apps.taskiq_engine_app",
}

handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
logging.getLogger("after_response").addHandler(handler)
logging.getLogger("after_response").setLevel(logging.INFO)

provider = spans.install_from_environment()
engine = importlib.import_module(ENGINE_MODULES[required_environment(ENGINE_ENV)]).engine


async def purchase(request: Request) -> JSONResponse:
    order = int(request.query_params["order"])
    tasks = request.state.after_response
    tasks.options(durable=True).add(
        record_effect, f"order-{order}", request.query_params.get("gate")
    )
    tasks.add(arecord_effect, f"local-{order}")
    return JSONResponse({"order": order})


async def stats(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), **dataclasses.asdict(app.stats())})


inner: Any = Starlette(
    routes=[Route("/purchase", purchase, methods=["POST"]), Route("/stats", stats)]
)
if provider is not None:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    inner = OpenTelemetryMiddleware(inner, tracer_provider=provider)

app = AfterResponseMiddleware(
    inner,
    store=SQLiteStore(
        required_environment("AR_TEST_DB"), heartbeat_interval=0.2, owner_timeout=1.0
    ),
    engine=engine,
    shutdown_timeout=5.0,
)
