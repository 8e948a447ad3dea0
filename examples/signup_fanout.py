"""Signup fan-out: one request, four side effects, each isolated from the others.

Run it (from the repository root)::

    python examples/signup_fanout.py

It starts a local SMTP server, three local HTTP services and the app on
http://127.0.0.1:8000. Then, in another terminal::

    curl -s localhost:8000/signup --json '{"email": "ada@example.com", "name": "Ada"}'

``POST /signup`` answers 201 at once; after the response, concurrently:

- a welcome email (SMTP, ``smtplib`` in a worker thread);
- an analytics beacon: the local analytics service is broken (500): the task fails, is logged
  (with its name and the request's method and path, never its arguments) and the others go on;
- a CRM sync with ``Retry(...)``: the local CRM fails its first request (503), and the retry
  succeeds;
- a chat notification (a Slack-style incoming webhook) under a per-call timeout
  (``collector.options(timeout=...)``): the local webhook never answers in time, so the task is
  cancelled and counted as timed out.

Environment: ``PORT`` (8000); ``SMTP_HOST``/``SMTP_PORT``, ``ANALYTICS_URL``, ``CRM_URL`` and
``SLACK_WEBHOOK_URL`` point at real services instead of the local stand-ins (each one set
replaces its stand-in); ``SLACK_TIMEOUT`` (seconds, default 1).
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

if not __package__:  # run as `python examples/signup_fanout.py`: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from after_response import AfterResponseMiddleware, Retry, side_effect
from examples.local_servers import (
    ALWAYS,
    Receiver,
    SMTPSink,
    serve,
    wait_for_interrupt,
)
from examples.mail import TRANSIENT_SMTP_ERRORS, Mailer, SMTPSettings


@dataclass(frozen=True)
class Settings:
    smtp: SMTPSettings
    analytics_url: str
    crm_url: str
    slack_webhook_url: str
    #: Seconds the chat notification may take before it is cancelled.
    slack_timeout: float = 1.0

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "smtp": SMTPSettings.from_env(),
            "analytics_url": os.environ.get("ANALYTICS_URL", ""),
            "crm_url": os.environ.get("CRM_URL", ""),
            "slack_webhook_url": os.environ.get("SLACK_WEBHOOK_URL", ""),
            "slack_timeout": float(os.environ.get("SLACK_TIMEOUT", cls.slack_timeout)),
        }
        values.update(overrides)
        return cls(**values)


class ServiceError(Exception):
    """A service answered with an error status."""


def _check(response: httpx.Response, service: str) -> None:
    # Not response.raise_for_status(): its message holds the URL, and a webhook URL is a
    # secret that must not reach the logs.
    if response.status_code >= 400:
        raise ServiceError(f"{service} answered {response.status_code}")


# -- the side effects ----------------------------------------------------------------------------


@side_effect(name="welcome_email", timeout=30, retry=Retry(retry_on=TRANSIENT_SMTP_ERRORS))
def send_welcome_email(mailer: Mailer, to: str, name: str) -> None:
    mailer.send(to, "Welcome!", f"Hello {name}, welcome aboard.")


@side_effect(name="analytics_beacon", timeout=5)
async def send_analytics_beacon(http: httpx.AsyncClient, url: str, event: dict[str, Any]) -> None:
    _check(await http.post(url, json=event), "analytics")


@side_effect(name="crm_sync", timeout=10, retry=Retry(attempts=3, backoff=0.2))
async def sync_crm(http: httpx.AsyncClient, url: str, contact: dict[str, Any]) -> None:
    _check(await http.put(url, json=contact), "crm")


@side_effect(name="slack_notify")
async def notify_slack(http: httpx.AsyncClient, url: str, text: str) -> None:
    _check(await http.post(url, json={"text": text}), "slack")


# -- the app -------------------------------------------------------------------------------------


async def signup(request: Request) -> JSONResponse:
    try:
        payload = await request.json()
        email, name = str(payload["email"]), str(payload["name"])
    except (ValueError, KeyError, TypeError):
        return JSONResponse({"error": "send {'email': ..., 'name': ...}"}, status_code=400)
    user_id = f"usr_{secrets.token_hex(6)}"
    # ... create the user here ...
    settings: Settings = request.app.state.settings
    http: httpx.AsyncClient = request.state.http
    after = request.state.after_response
    after.add(send_welcome_email, request.app.state.mailer, email, name)
    after.add(
        send_analytics_beacon, http, settings.analytics_url, {"event": "signup", "user": user_id}
    )
    after.add(sync_crm, http, settings.crm_url, {"id": user_id, "email": email, "name": name})
    after.options(timeout=settings.slack_timeout).add(
        notify_slack, http, settings.slack_webhook_url, f"New signup: {name}"
    )
    return JSONResponse({"user_id": user_id}, status_code=201)


def create_app(settings: Settings, **middleware_options: Any) -> AfterResponseMiddleware:
    """The signup app, wrapped in ``AfterResponseMiddleware`` (keep the reference: it has
    ``drain()`` and ``stats()``)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        # One client for all side effects. The middleware drains them at shutdown before
        # this block exits, so the client is still open for the last ones.
        async with httpx.AsyncClient(timeout=10.0) as http:
            yield {"http": http}

    app = Starlette(routes=[Route("/signup", signup, methods=["POST"])], lifespan=lifespan)
    app.state.settings = settings
    app.state.mailer = Mailer(settings.smtp)
    return AfterResponseMiddleware(app, **middleware_options)


def local_services() -> dict[str, Receiver]:
    """Stand-ins for the three HTTP services: broken, flaky and slow."""
    return {
        "analytics": Receiver(status=500, echo="analytics"),
        "crm": Receiver(fail_first=1, echo="crm"),
        "slack": Receiver(slow_first=ALWAYS, echo="slack"),
    }


async def main() -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    async with AsyncExitStack() as stack:
        if not os.environ.get("SMTP_HOST"):
            sink = stack.enter_context(
                SMTPSink(delay=(0.1, 0.2), on_message=lambda mail: print(f"[smtp] {mail.subject}"))
            )
            smtp = replace(settings.smtp, host=sink.host, port=sink.port)
            settings = replace(settings, smtp=smtp)
        services = local_services()
        routes = [Route(f"/{name}", receiver) for name, receiver in services.items()]
        base = await stack.enter_async_context(serve(Starlette(routes=routes)))
        settings = replace(
            settings,
            analytics_url=settings.analytics_url or f"{base}/analytics",
            crm_url=settings.crm_url or f"{base}/crm",
            slack_webhook_url=settings.slack_webhook_url or f"{base}/slack",
        )
        port = int(os.environ.get("PORT", "8000"))
        url = await stack.enter_async_context(serve(create_app(settings), port=port))
        print(f"signup app on {url}; local services on {base}: analytics is broken (500),")
        print("crm fails its first request (503), slack never answers in time")
        print(f'  curl -s {url}/signup --json \'{{"email": "ada@example.com", "name": "Ada"}}\'')
        print("Ctrl-C to stop (pending side effects finish first).")
        await wait_for_interrupt()


if __name__ == "__main__":
    anyio.run(main)
