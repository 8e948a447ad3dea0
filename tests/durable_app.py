"""The app the crash tests run under ``uvicorn`` in processes of their own, configured by
environment variables (a server process cannot be handed objects):

- ``AR_TEST_DB`` (required): the SQLite store file, shared by every process of a test.
- ``AR_TEST_LEDGER`` (required): the side effects' ledger (see :mod:`tests.durable_ledger`).
- ``AR_TEST_SPANS``: if set, every finished span is written there as a JSON line, and the
  app runs OpenTelemetry's ASGI middleware (the request's server span).
- ``AR_TEST_MAX_CONCURRENCY`` (100), ``AR_TEST_SHUTDOWN_TIMEOUT`` (20): middleware options.

Routes: ``POST /checkout?order=K`` adds the durable :func:`~tests.durable_ledger.ship`;
``POST /charge?order=K`` adds the durable :func:`~tests.durable_ledger.charge` (2 attempts);
``POST /crash?order=K&innocent=N`` adds N durable ``ship`` (orders K+1 to K+N), then the durable
:func:`~tests.durable_ledger.crash` (order K), which kills the process that runs it;
``GET /stats`` answers the middleware's counts and the process id.

The store heartbeats every 0.2 s and counts an owner dead after 1 s without one, so that
takeovers happen within a test's time.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from after_response import AfterResponseMiddleware, Retry, SQLiteStore

from . import durable_ledger


def _required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"tests.durable_app needs ${name}: set it in the server's environment")
    return value


class JsonLinesSpanExporter(SpanExporter):
    """Writes each finished span as one JSON line (ids in hex), fsynced: the spans of a
    process killed with SIGKILL are on disk up to the last one that ended."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            context, parent = span.get_span_context(), span.parent
            durable_ledger.append(
                self.path,
                {
                    "name": span.name,
                    "kind": span.kind.name,
                    "trace_id": f"{context.trace_id:032x}" if context else None,
                    "span_id": f"{context.span_id:016x}" if context else None,
                    "parent_span_id": f"{parent.span_id:016x}" if parent else None,
                    "attributes": dict(span.attributes or {}),
                    "pid": os.getpid(),
                },
            )
        return SpanExportResult.SUCCESS


LEDGER = _required("AR_TEST_LEDGER")
SPANS = os.environ.get("AR_TEST_SPANS")

handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
logging.getLogger("after_response").addHandler(handler)
logging.getLogger("after_response").setLevel(logging.INFO)


async def checkout(request: Request) -> JSONResponse:
    order = int(request.query_params["order"])
    request.state.after_response.options(durable=True).add(
        durable_ledger.ship, LEDGER, order, to=f"buyer-{order}@example.com"
    )
    return JSONResponse({"order": order})


async def charge(request: Request) -> JSONResponse:
    order = int(request.query_params["order"])
    request.state.after_response.options(durable=True, retry=Retry(attempts=2, backoff=0.01)).add(
        durable_ledger.charge, LEDGER, order, card_holder=f"holder-{order}@example.com"
    )
    return JSONResponse({"order": order})


async def crash(request: Request) -> JSONResponse:
    order = int(request.query_params["order"])
    collector = request.state.after_response.options(durable=True)
    for innocent in range(order + 1, order + 1 + int(request.query_params["innocent"])):
        collector.add(durable_ledger.ship, LEDGER, innocent, to=f"buyer-{innocent}@example.com")
    collector.add(durable_ledger.crash, LEDGER, order)
    return JSONResponse({"order": order})


async def stats(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), **dataclasses.asdict(app.stats())})


provider: TracerProvider | None = None
inner: Any = Starlette(
    routes=[
        Route("/checkout", checkout, methods=["POST"]),
        Route("/charge", charge, methods=["POST"]),
        Route("/crash", crash, methods=["POST"]),
        Route("/stats", stats),
    ]
)
if SPANS:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(SPANS)))
    inner = OpenTelemetryMiddleware(inner, tracer_provider=provider)

app = AfterResponseMiddleware(
    inner,
    store=SQLiteStore(_required("AR_TEST_DB"), heartbeat_interval=0.2, owner_timeout=1.0),
    max_concurrency=int(os.environ.get("AR_TEST_MAX_CONCURRENCY", "100")),
    shutdown_timeout=float(os.environ.get("AR_TEST_SHUTDOWN_TIMEOUT", "20")),
    tracer_provider=provider,
)
