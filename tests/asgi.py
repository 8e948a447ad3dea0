"""Drive an ASGI app directly: a lifespan runner and a request call with recorded sends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from starlette.types import ASGIApp, Message


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run the app's lifespan startup, yield, then its shutdown, as a server would."""
    to_app, from_server = anyio.create_memory_object_stream[Message](4)
    started, stopped = anyio.Event(), anyio.Event()

    async def send(message: Message) -> None:
        if message["type"].startswith("lifespan.startup"):
            started.set()
        elif message["type"].startswith("lifespan.shutdown"):
            stopped.set()

    async with anyio.create_task_group() as task_group:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        task_group.start_soon(app, scope, from_server.receive, send)
        await to_app.send({"type": "lifespan.startup"})
        with anyio.fail_after(5):
            await started.wait()
        try:
            yield
        finally:
            await to_app.send({"type": "lifespan.shutdown"})
            with anyio.fail_after(30):
                await stopped.wait()


def http_scope(path: str = "/", method: str = "GET", **extra: Any) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
        **extra,
    }


async def call(
    app: ASGIApp, scope: dict[str, Any], incoming: list[Message] | None = None
) -> list[Message]:
    """Call ``app`` once; return the messages it sent."""
    messages = list(incoming or [{"type": "http.request", "body": b"", "more_body": False}])
    sent: list[Message] = []

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent
