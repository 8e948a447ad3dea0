"""The shop both processes import: its side effects and its web app.

``send_receipt`` is durable: with an engine, it is written to the store's outbox before the
response completes and runs in the engine's worker, which imports it from here by its name
(``examples.engines.shop:send_receipt``). ``count_sale`` is not durable: it still runs in
the web process, after the response, as without an engine.

Environment: ``AFTER_RESPONSE_DB``, the store's file (``after_response.sqlite3``).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from after_response import AfterResponseMiddleware, Retry, SQLiteStore, current_task, side_effect

DEFAULT_DB = "after_response.sqlite3"


@side_effect(durable=True, retry=Retry(attempts=5, backoff=1), timeout=30)
def send_receipt(order_id: str, email: str, item: str, amount: int) -> None:
    """Email the receipt (here: print that it was sent). Runs in the engine's worker.

    A delivery may be repeated (at-least-once): the task's id, the same on every delivery,
    is the idempotency key a real mailer would be given.
    """
    task = current_task()
    # Ids only: the email address stays out of the output, as out of any log.
    print(
        f"[receipt] order {order_id}: receipt sent by pid {os.getpid()} "
        f"(idempotency key: the task id {task.id})",
        flush=True,
    )


def count_sale(item: str, amount: int) -> None:
    """Count the sale for analytics (here: print it). Not durable: runs in the web process."""
    print(f"[analytics] sale of {item} counted in the web process (pid {os.getpid()})", flush=True)


async def purchase(request: Request) -> JSONResponse:
    """``POST /purchase {"item": ..., "amount": cents, "email": ...}``: 201 with the order."""
    try:
        payload = await request.json()
        item, amount, email = str(payload["item"]), int(payload["amount"]), str(payload["email"])
    except (ValueError, KeyError, TypeError):
        return JSONResponse(
            {"error": "send {'item': ..., 'amount': cents, 'email': ...}"}, status_code=400
        )
    order_id = f"ord_{uuid.uuid4().hex[:12]}"
    # ... record the order and take the payment here ...
    after = request.state.after_response
    # One receipt per order, even if the client submits twice: the key deduplicates.
    after.options(key=f"{order_id}-receipt").add(send_receipt, order_id, email, item, amount)
    after.add(count_sale, item, amount)
    return JSONResponse({"order": order_id}, status_code=201)


def create_app(**middleware_options: Any) -> AfterResponseMiddleware:
    """The shop app with its durable store; pass ``engine=`` to hand receipts to an engine's
    workers (``web_celery.py``, ``web_taskiq.py``)."""
    store = SQLiteStore(os.environ.get("AFTER_RESPONSE_DB", DEFAULT_DB))
    app = Starlette(routes=[Route("/purchase", purchase, methods=["POST"])])
    return AfterResponseMiddleware(app, store=store, **middleware_options)
