"""``after_response.fastapi.AfterResponse``: a path operation's collector, by dependency."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI, Request, WebSocket
from starlette.types import Message

from after_response import AfterResponseMiddleware, Collector, NoActiveRequestError, current
from after_response.fastapi import AfterResponse

from .asgi import call, http_scope


class Mailer:
    """A service that takes the collector as a dependency of its own."""

    def __init__(self, after: AfterResponse) -> None:
        self.after = after

    def send(self, deliver: Callable[[str], None], to: str) -> None:
        self.after.add(deliver, f"mail to {to}")


def client_for(app: FastAPI) -> httpx.AsyncClient:
    # No lifespan under ASGITransport: side effects run inside the request's call, after
    # the response, so they are done when the client has it.
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.anyio
async def test_dependency_gives_the_collector_of_the_request() -> None:
    seen: list[tuple[object, ...]] = []
    ran: list[str] = []

    async def effect(email: str) -> None:
        ran.append(email)

    app = FastAPI()
    app.add_middleware(AfterResponseMiddleware)

    @app.post("/login")
    async def login(request: Request, after: AfterResponse) -> dict[str, str]:
        seen.append((after, request.state.after_response, current()))
        after.add(effect, "ada@example.com")
        return {"message": "Code sent"}

    async with client_for(app) as client:
        response = await client.post("/login")
    assert response.json() == {"message": "Code sent"}
    [(after, state, from_context)] = seen
    assert isinstance(after, Collector)
    assert after is state is from_context
    assert ran == ["ada@example.com"]


@pytest.mark.anyio
async def test_dependency_works_in_sub_dependencies_and_sync_path_operations() -> None:
    ran: list[str] = []

    def record(what: str) -> None:
        ran.append(what)

    app = FastAPI()
    app.add_middleware(AfterResponseMiddleware)

    @app.post("/signup")
    def signup(mailer: Annotated[Mailer, Depends()], after: AfterResponse) -> str:
        assert mailer.after is after
        mailer.send(record, "ada@example.com")
        return "ok"

    async with client_for(app) as client:
        assert (await client.post("/signup")).status_code == 200
    assert ran == ["mail to ada@example.com"]


@pytest.mark.anyio
async def test_dependency_finds_the_collector_under_a_custom_state_key() -> None:
    seen: list[tuple[object, object]] = []
    app = FastAPI()
    app.add_middleware(AfterResponseMiddleware, state_key="tasks")

    @app.get("/")
    async def endpoint(request: Request, after: AfterResponse) -> None:
        seen.append((after, request.state.tasks))

    async with client_for(app) as client:
        assert (await client.get("/")).status_code == 200
    [(after, state)] = seen
    assert after is state


@pytest.mark.anyio
async def test_dependency_without_the_middleware_says_how_to_install_it() -> None:
    app = FastAPI()

    @app.get("/")
    async def endpoint(after: AfterResponse) -> None:
        raise AssertionError("not reached")

    async with client_for(app) as client:
        with pytest.raises(
            NoActiveRequestError, match=r"app\.add_middleware\(AfterResponseMiddleware\)"
        ) as raised:
            await client.get("/")
    assert str(raised.value).startswith("FastAPI's AfterResponse dependency found no collector")


@pytest.mark.anyio
async def test_dependency_works_in_websocket_endpoints() -> None:
    ran: list[str] = []

    def record(what: str) -> None:
        ran.append(what)

    app = FastAPI()
    app.add_middleware(AfterResponseMiddleware)

    @app.websocket("/ws")
    async def chat(websocket: WebSocket, after: AfterResponse) -> None:
        await websocket.accept()
        after.add(record, await websocket.receive_text())
        await websocket.close()

    scope = {**http_scope("/ws"), "type": "websocket", "scheme": "ws", "subprotocols": []}
    del scope["method"]
    incoming: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "hello"},
    ]
    sent = await call(app, scope, incoming)
    assert [message["type"] for message in sent] == ["websocket.accept", "websocket.close"]
    assert ran == ["hello"]
