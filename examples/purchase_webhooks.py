"""Purchase webhooks: each subscriber gets the event after the response, with retries and an
idempotency key, so that a retried delivery is recognisable downstream.

Run it (from the repository root)::

    python examples/purchase_webhooks.py

It starts three local webhook subscribers and the app on http://127.0.0.1:8000. Then::

    curl -s localhost:8000/purchase --json '{"item": "book", "amount": 1200}'

``POST /purchase`` answers 201 at once; after the response, one delivery per subscriber, named
after it (``deliver_webhook[ledger]``: a retry warning says which subscriber failed, and the name
stays low-cardinality, one per subscriber, as span and metric names must). Each delivery has
its own ``Idempotency-Key`` header, made when the purchase added it and the same on every
attempt of that delivery (different per subscriber and per event), so a subscriber that sees a
key again answers without acting twice. Deliveries are retried with backoff on 5xx, 429,
connection errors and timeouts (``TimeoutError``: a timed-out attempt counts as one), and not
on other 4xx. The local subscribers: ``shop`` answers at once; ``ledger`` fails the first
request it gets (503); ``mailer`` processes the first request but answers too late, so the
delivery times out and is retried, and the retry is recognised by its key and not processed
again: the subscriber prints ``duplicate, recognised by its key: not processed again``.

Environment: ``PORT`` (8000); ``WEBHOOK_SUBSCRIBERS``: comma-separated subscribers to deliver
to instead of the local ones, each ``name=URL`` (a bare URL is named after its host);
``DELIVERY_TIMEOUT`` (seconds per attempt, default 2).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

if not __package__:  # run as `python examples/purchase_webhooks.py`: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from after_response import AfterResponseMiddleware, Retry, side_effect
from examples.local_servers import Receiver, serve, wait_for_interrupt


@dataclass(frozen=True)
class Subscriber:
    """Where to deliver, and the name its deliveries carry in logs, spans and metrics."""

    name: str
    url: str

    @classmethod
    def parse(cls, entry: str) -> Subscriber:
        """``"name=URL"``, or a bare URL named after its host (never its path, which may hold
        a secret)."""
        name, separator, url = entry.partition("=")
        if not separator or "://" in name:  # a bare URL (its query string may hold a "=")
            name, url = urlsplit(entry.strip()).hostname or "", entry
        if not name.strip() or not url.strip().startswith(("http://", "https://")):
            raise ValueError(
                "WEBHOOK_SUBSCRIBERS takes comma-separated name=URL entries, e.g. "
                "ledger=https://ledger.example/hooks; one entry is not of that form"
            )
        return cls(name.strip(), url.strip())


@dataclass(frozen=True)
class Settings:
    subscribers: tuple[Subscriber, ...]
    #: Seconds each delivery attempt may take before it is cancelled (and retried).
    delivery_timeout: float = 2.0

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        entries = os.environ.get("WEBHOOK_SUBSCRIBERS", "")
        values: dict[str, Any] = {
            "subscribers": tuple(
                Subscriber.parse(entry) for entry in entries.split(",") if entry.strip()
            ),
            "delivery_timeout": float(os.environ.get("DELIVERY_TIMEOUT", cls.delivery_timeout)),
        }
        values.update(overrides)
        return cls(**values)


class DeliveryFailed(Exception):
    """The subscriber answered 5xx or 429: worth another attempt."""


class DeliveryRejected(Exception):
    """The subscriber answered another 4xx: another attempt would be rejected too."""


@side_effect(
    name="deliver_webhook",
    retry=Retry(
        attempts=5,
        backoff=0.25,
        max_backoff=30,
        retry_on=(DeliveryFailed, httpx.TransportError, TimeoutError),
    ),
)
async def deliver_webhook(
    http: httpx.AsyncClient, url: str, idempotency_key: str, event: dict[str, Any]
) -> None:
    """POST ``event`` to one subscriber. ``idempotency_key`` is made once per delivery, by
    the request that added it, so every attempt carries the same one."""
    response = await http.post(url, json=event, headers={"Idempotency-Key": idempotency_key})
    # Messages name the status only: subscriber URLs often hold secrets.
    if response.status_code >= 500 or response.status_code == 429:
        raise DeliveryFailed(f"the subscriber answered {response.status_code}")
    if response.status_code >= 400:
        raise DeliveryRejected(f"the subscriber answered {response.status_code}")


async def purchase(request: Request) -> JSONResponse:
    try:
        payload = await request.json()
        item, amount = str(payload["item"]), int(payload["amount"])
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": "send {'item': ..., 'amount': cents}"}, status_code=400)
    order_id = f"ord_{uuid.uuid4().hex[:12]}"
    # ... record the order and take the payment here ...
    event = {
        "id": f"evt_{uuid.uuid4().hex}",
        "type": "order.paid",
        "created": datetime.now(timezone.utc).isoformat(),
        "data": {"order": order_id, "item": item, "amount": amount},
    }
    settings: Settings = request.app.state.settings
    for subscriber in settings.subscribers:
        # One name per subscriber: a retry warning says which one failed.
        after = request.state.after_response.options(
            name=f"deliver_webhook[{subscriber.name}]", timeout=settings.delivery_timeout
        )
        key = f"dlv_{uuid.uuid4().hex}"
        after.add(deliver_webhook, request.state.http, subscriber.url, key, event)
    return JSONResponse({"order": order_id}, status_code=201)


def create_app(settings: Settings, **middleware_options: Any) -> AfterResponseMiddleware:
    """The shop app, wrapped in ``AfterResponseMiddleware`` (keep the reference: it has
    ``drain()`` and ``stats()``)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=30.0) as http:
            yield {"http": http}

    app = Starlette(routes=[Route("/purchase", purchase, methods=["POST"])], lifespan=lifespan)
    app.state.settings = settings
    return AfterResponseMiddleware(app, **middleware_options)


def local_subscribers() -> dict[str, Receiver]:
    """Stand-ins for three subscribers: a reliable one, a flaky one and a slow one."""
    return {
        "shop": Receiver(echo="shop"),
        "ledger": Receiver(fail_first=1, echo="ledger"),
        "mailer": Receiver(slow_first=1, echo="mailer"),
    }


async def main() -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    async with AsyncExitStack() as stack:
        if not settings.subscribers:
            subscribers = local_subscribers()
            routes = [Route(f"/{name}", receiver) for name, receiver in subscribers.items()]
            base = await stack.enter_async_context(serve(Starlette(routes=routes)))
            settings = replace(
                settings,
                subscribers=tuple(Subscriber(name, f"{base}/{name}") for name in subscribers),
            )
        port = int(os.environ.get("PORT", "8000"))
        url = await stack.enter_async_context(serve(create_app(settings), port=port))
        names = ", ".join(subscriber.name for subscriber in settings.subscribers)
        print(f"shop app on {url}; subscribers: {names}")
        print(f'  curl -s {url}/purchase --json \'{{"item": "book", "amount": 1200}}\'')
        print("Ctrl-C to stop (pending deliveries finish first).")
        await wait_for_interrupt()


if __name__ == "__main__":
    anyio.run(main)
