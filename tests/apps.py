"""Small Starlette apps and recorders shared by the core behaviour tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class SendRecorder:
    """Sits between the server and the middleware and notes each message once the server's
    ``send`` has returned, so a test can order "body sent" against "task started"."""

    def __init__(self, app: ASGIApp, events: list[str]) -> None:
        self.app = app
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def recording_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body":
                more = message.get("more_body", False)
                self.events.append("body sent" if not more else "chunk sent")

        await self.app(scope, receive, recording_send if scope["type"] == "http" else send)


def app_adding(
    *effects: Callable[..., Any], status: int = 200, raise_after: bool = False
) -> Starlette:
    """A Starlette app whose GET / adds ``effects`` and answers ``status``."""

    async def endpoint(request: Request) -> Response:
        for effect in effects:
            request.state.after_response.add(effect)
        if raise_after:
            raise RuntimeError("handler failed")
        return PlainTextResponse("ok", status_code=status)

    return Starlette(routes=[Route("/", endpoint, methods=["GET", "HEAD"])])
