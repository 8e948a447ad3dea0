"""A bare ASGI callable, no framework: handlers use ``after_response.current()`` and the
app speaks the lifespan protocol itself."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from after_response import current

from . import Built, Probe, add_effect, chunks, wrapped


def create_app(probe: Probe, **options: Any) -> Built:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    probe.record("app shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert scope["type"] == "http", "this app speaks HTTP only"
        query = dict(parse_qsl(scope["query_string"].decode()))
        if scope["path"] == "/stream":
            request_id = add_effect(current(), probe, query)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            async for chunk in chunks(request_id):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        status, body = 404, "not found"
        if scope["path"] == "/effect":
            status, body = 200, f"queued {add_effect(current(), probe, query)}"
        elif scope["path"] == "/fail":
            status, body = 500, f"failed {add_effect(current(), probe, query)}"
        elif scope["path"] == "/raise":
            add_effect(current(), probe, query)
            raise RuntimeError("the handler failed after adding a side effect")
        elif scope["path"] == "/collector":
            request_id = int(query["id"])
            probe.collectors[request_id] = (scope["state"]["after_response"], current())
            status, body = 200, f"collector {request_id}"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})

    return wrapped(app, probe, app_lifespan=True, **options)
