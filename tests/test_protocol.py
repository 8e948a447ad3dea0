"""ASGI protocol corners, driven directly with recorded messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from after_response import AfterResponseMiddleware, SQLiteStore, StoreError, current

from .asgi import call, http_scope, lifespan
from .servers import serve_uvicorn, websocket_round_trip

pytestmark = pytest.mark.anyio


def app_sending(*messages: Message, raise_after: bool = False) -> Any:
    """A bare app that adds one task, sends ``messages`` and maybe raises."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan")
        current().add(scope["state"]["effect"])
        for message in messages:
            await send(message)
        if raise_after:
            raise RuntimeError("after the response")

    return app


START = {"type": "http.response.start", "status": 200, "headers": []}


async def run_one(app: Any, *, events: list[str] | None = None) -> tuple[list[str], Any]:
    """Call ``app`` once with lifespan; events interleave the sends and the task's start."""
    events = [] if events is None else events

    async def effect() -> None:
        events.append("task")

    middleware = AfterResponseMiddleware(app)

    async def recording_send(message: Message) -> None:
        events.append(message["type"])

    async with lifespan(middleware):
        scope = http_scope(state={"effect": effect})

        async def receive() -> Message:
            await anyio.sleep_forever()
            raise AssertionError

        try:
            await middleware(scope, receive, recording_send)
        except RuntimeError:
            events.append("raised")
        assert await middleware.drain(timeout=5)
    return events, middleware.stats()


async def test_pathsend_is_a_final_message() -> None:
    pathsend = {"type": "http.response.pathsend", "path": "/etc/hostname"}
    events, stats = await run_one(app_sending(START, pathsend))
    assert events == ["http.response.start", "http.response.pathsend", "task"]
    assert stats.succeeded == 1


async def test_zerocopysend_is_final_only_without_more_body() -> None:
    first = {"type": "http.response.zerocopysend", "file": 3, "more_body": True}
    last = {"type": "http.response.zerocopysend", "file": 3}
    events, _ = await run_one(app_sending(START, first, last))
    assert events == ["http.response.start"] + ["http.response.zerocopysend"] * 2 + ["task"]


async def test_with_trailers_the_last_trailers_message_completes_the_response() -> None:
    start = {**START, "trailers": True}
    body = {"type": "http.response.body", "body": b"x"}
    trailers = {"type": "http.response.trailers", "headers": [], "more_trailers": False}
    events, _ = await run_one(app_sending(start, body, trailers))
    assert events == [
        "http.response.start",
        "http.response.body",
        "http.response.trailers",
        "task",
    ]


async def test_exception_after_a_complete_response_does_not_discard_its_tasks() -> None:
    body = {"type": "http.response.body", "body": b"ok"}
    events, stats = await run_one(app_sending(START, body, raise_after=True))
    assert events[:2] == ["http.response.start", "http.response.body"]
    assert sorted(events[2:]) == ["raised", "task"]
    assert (stats.succeeded, stats.discarded) == (1, 0)


async def test_app_that_returns_without_a_response_counts_as_failed() -> None:
    events, stats = await run_one(app_sending())
    assert events == []
    assert stats.discarded == 1


async def test_client_that_disconnects_mid_response_does_not_cancel_the_tasks() -> None:
    ran: list[str] = []

    async def effect() -> None:
        ran.append("effect")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        current().add(effect)
        await send(START)
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        message = await receive()
        assert message["type"] == "http.disconnect"
        raise OSError("client went away")  # as a streaming response might

    middleware = AfterResponseMiddleware(app)
    with pytest.raises(OSError, match="client went away"):
        await call(middleware, http_scope(), [{"type": "http.disconnect"}])
    assert ran == ["effect"]
    assert middleware.stats().succeeded == 1


async def test_send_failing_because_the_client_left_keeps_the_tasks() -> None:
    ran: list[str] = []

    async def effect() -> None:
        ran.append("effect")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        current().add(effect)
        await send(START)

    async def broken_send(message: Message) -> None:
        raise OSError("connection reset")

    middleware = AfterResponseMiddleware(app)
    with pytest.raises(OSError, match="connection reset"):
        await middleware(http_scope(), call_receive_never, broken_send)
    assert ran == ["effect"]


async def call_receive_never() -> Message:
    await anyio.sleep_forever()
    raise AssertionError


async def test_cancelled_request_hands_decided_tasks_to_the_running_executor() -> None:
    ran: list[str] = []
    handler_waiting = anyio.Event()

    async def effect() -> None:
        ran.append("effect")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan")
        current().add(effect)
        handler_waiting.set()
        await anyio.sleep_forever()

    middleware = AfterResponseMiddleware(app)
    async with lifespan(middleware):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, middleware, http_scope())
            await handler_waiting.wait()
            tg.cancel_scope.cancel()
        assert await middleware.drain(timeout=5)
    assert ran == ["effect"]


async def test_cancelled_request_without_executor_abandons_and_counts_its_tasks() -> None:
    handler_waiting = anyio.Event()

    async def effect() -> None: ...

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        current().add(effect)
        handler_waiting.set()
        await anyio.sleep_forever()

    middleware = AfterResponseMiddleware(app)
    async with anyio.create_task_group() as tg:
        tg.start_soon(call, middleware, http_scope())
        await handler_waiting.wait()
        tg.cancel_scope.cancel()
    stats = middleware.stats()
    assert (stats.abandoned, stats.collected) == (1, 0)


async def test_other_scope_types_pass_through_untouched() -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    scope = {"type": "custom", "state": {"x": 1}}
    await AfterResponseMiddleware(app)(scope, call_receive_never, call_receive_never)  # type: ignore[arg-type]
    assert seen == [{"type": "custom", "state": {"x": 1}}]


async def test_lifespan_startup_failure_propagates() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise RuntimeError("database unreachable")

    messages = [{"type": "lifespan.startup"}]
    with pytest.raises(RuntimeError, match="database unreachable"):
        await call(AfterResponseMiddleware(app), {"type": "lifespan", "state": {}}, messages)


async def without_lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("no lifespan")


@pytest.mark.parametrize(
    "wrapped", [Starlette(), without_lifespan], ids=["speaks-lifespan", "without-lifespan"]
)
async def test_a_store_that_cannot_be_opened_fails_lifespan_startup(
    wrapped: Any, tmp_path: Path
) -> None:
    """The middleware answers ``lifespan.startup.failed`` itself, with the store's error: a
    server in lifespan mode "auto" would take the exception alone for "lifespan unsupported"."""
    store = tmp_path / "no-such-directory" / "tasks.sqlite3"
    middleware = AfterResponseMiddleware(wrapped, store=SQLiteStore(str(store)))
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        sent.append(message)

    # The store's error itself, not an exception group, so a server logs what it says.
    with pytest.raises(StoreError, match="does its directory exist") as raised:
        await middleware({"type": "lifespan", "state": {}}, receive, send)
    assert sent == [
        {
            "type": "lifespan.startup.failed",
            "message": f"AfterResponseMiddleware could not start: StoreError: {raised.value}",
        }
    ]


async def test_websocket_tasks_run_after_the_connection_closes() -> None:
    events: list[str] = []
    closed = anyio.Event()

    async def effect() -> None:
        events.append("task")

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        websocket.state.after_response.add(effect)
        await websocket.send_text("hi")
        await websocket.receive_text()
        events.append("closing")
        await websocket.close()
        closed.set()

    middleware = AfterResponseMiddleware(Starlette(routes=[WebSocketRoute("/ws", chat)]))
    async with serve_uvicorn(middleware) as url:
        port = int(url.rsplit(":", 1)[1])
        stream = await anyio.connect_tcp("127.0.0.1", port)
        await websocket_round_trip(stream)
        await closed.wait()
        assert await middleware.drain(timeout=5)
    assert events == ["closing", "task"]


async def test_websocket_handler_that_raises_discards_its_tasks() -> None:
    async def effect() -> None: ...

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        current().add(effect)
        await receive()
        raise RuntimeError("handler bug")

    middleware = AfterResponseMiddleware(app)
    scope = {"type": "websocket", "path": "/ws", "state": {}}
    with pytest.raises(RuntimeError):
        await call(middleware, scope, [{"type": "websocket.connect"}])
    assert middleware.stats().discarded == 1


async def test_websocket_client_disconnect_keeps_the_tasks() -> None:
    ran: list[str] = []

    async def effect() -> None:
        ran.append("effect")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        current().add(effect)
        await receive()
        await receive()
        raise RuntimeError("disconnected")  # what a framework may raise on disconnect

    middleware = AfterResponseMiddleware(app)
    scope = {"type": "websocket", "path": "/ws", "state": {}}
    incoming = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1001}]
    with pytest.raises(RuntimeError):
        await call(middleware, scope, incoming)
    assert ran == ["effect"]


async def test_httpx_asgi_transport_works_without_lifespan() -> None:
    ran: list[str] = []

    async def effect() -> None:
        ran.append("effect")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        current().add(effect)
        await send(START)
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = AfterResponseMiddleware(app)
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/")).text == "ok"
    assert ran == ["effect"]


async def test_app_that_raises_before_responding_discards_with_the_exception_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def effect() -> None: ...

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        current().add(effect)
        raise LookupError("user 42 not found")

    middleware = AfterResponseMiddleware(app)
    with pytest.raises(LookupError):
        await call(middleware, http_scope())
    assert middleware.stats().discarded == 1
    assert "because the app raised LookupError" in caplog.text
    assert "user 42" not in caplog.text


async def test_cancelled_websocket_hands_its_tasks_to_the_executor() -> None:
    ran: list[str] = []
    connected = anyio.Event()

    async def effect() -> None:
        ran.append("effect")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan")
        current().add(effect)
        connected.set()
        await anyio.sleep_forever()

    middleware = AfterResponseMiddleware(app)
    async with lifespan(middleware):
        async with anyio.create_task_group() as tg:
            scope = {"type": "websocket", "path": "/ws", "state": {}}
            tg.start_soon(call, middleware, scope, [{"type": "websocket.connect"}])
            await connected.wait()
            tg.cancel_scope.cancel()
        assert await middleware.drain(timeout=5)
    assert ran == ["effect"]
