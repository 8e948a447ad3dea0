"""after_response.testing: the errors its helpers give when they are used wrong, and the
modes' edges (the testing page's examples cover the ordinary use, in tests/test_docs.py)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from litestar import Litestar, get
from litestar import Request as LitestarRequest
from litestar.testing import TestClient as LitestarTestClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import after_response
from after_response import AfterResponseMiddleware
from after_response.testing import adrain, capture, drain, find_middlewares, run_inline

from .apps import app_adding
from .servers import serve_in_thread


def test_drain_needs_an_open_client() -> None:
    client = TestClient(AfterResponseMiddleware(app_adding()))
    with pytest.raises(RuntimeError, match="with TestClient"):
        drain(client)


def test_drain_says_how_to_install_the_middleware_when_there_is_none() -> None:
    with TestClient(app_adding()) as client, pytest.raises(LookupError, match="add_middleware"):
        drain(client)


def test_drain_raises_when_side_effects_outlive_its_timeout() -> None:
    release = anyio.Event()

    async def stuck() -> None:
        await release.wait()

    app = AfterResponseMiddleware(app_adding(stuck), shutdown_timeout=0.1)
    with TestClient(app) as client:
        client.get("/")
        with pytest.raises(TimeoutError, match="still running"):
            drain(client, timeout=0.05)


def test_middlewares_are_found_through_starlette_and_wrapping_layers() -> None:
    inner = AfterResponseMiddleware(app_adding())
    starlette = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    starlette.add_middleware(AfterResponseMiddleware)
    with TestClient(starlette):  # builds the middleware stack
        pass
    assert find_middlewares(inner) == [inner]
    [found] = find_middlewares(starlette)
    assert isinstance(found, AfterResponseMiddleware)
    assert find_middlewares(app_adding()) == []


def test_captured_calls_are_checked_and_not_counted() -> None:
    async def send_email(to: str, code: str) -> None:
        raise AssertionError("never runs while capturing")

    async def endpoint(request: Request) -> PlainTextResponse:
        request.state.after_response.options(timeout=3).add(send_email, "a@example.com", "1")
        if request.query_params.get("wrong"):
            request.state.after_response.add(send_email, "a@example.com")  # missing 'code'
        return PlainTextResponse("ok")

    app = AfterResponseMiddleware(Starlette(routes=[Route("/", endpoint)]))
    with TestClient(app, raise_server_exceptions=True) as client, capture() as calls:
        client.get("/")
        with pytest.raises(TypeError, match="missing a required argument: 'code'"):
            client.get("/?wrong=1")
    assert len(calls) == 2  # one per request: the wrong add raised before it was recorded
    call = calls[0]
    assert (call.fn, call.args, call.timeout) == (send_email, ("a@example.com", "1"), 3)
    assert app.stats().added == 0


def test_capture_blocks_do_not_nest() -> None:
    with capture(), pytest.raises(RuntimeError, match="do not nest"), capture():
        pass


def test_inline_mode_restores_the_background_executor_after_the_block() -> None:
    ran: list[str] = []

    async def effect() -> None:
        ran.append("ran")

    app = AfterResponseMiddleware(app_adding(effect))
    with TestClient(app) as client:
        with run_inline():
            client.get("/")
            assert ran == ["ran"]  # done with the response
        client.get("/")
        drain(client)
    assert ran == ["ran", "ran"]


@pytest.mark.anyio
async def test_adrain_says_how_to_install_the_middleware_when_there_is_none() -> None:
    with pytest.raises(LookupError, match="AfterResponseMiddleware"):
        await adrain(app_adding())


def test_drain_waits_for_the_follow_ups_side_effects_add() -> None:
    # The order is forced: the follow-up is added after middleware.drain() began (so that
    # drain does not wait for it), and ends only once a second drain has begun.
    ran: list[str] = []
    events: dict[str, anyio.Event] = {}
    drains = 0

    def event(name: str) -> anyio.Event:  # made on the server's loop, where it is awaited
        return events.setdefault(name, anyio.Event())

    async def follow_up() -> None:
        await event("a second drain began").wait()
        ran.append("follow-up")

    async def first() -> None:
        await event("drain began").wait()
        after_response.current().add(follow_up)
        ran.append("first")

    middleware = AfterResponseMiddleware(app_adding(first))
    drain_once = middleware.drain

    async def observed_drain(timeout: float | None = None) -> bool:
        nonlocal drains
        drains += 1
        event("drain began" if drains == 1 else "a second drain began").set()
        return await drain_once(timeout)

    middleware.drain = observed_drain  # type: ignore[method-assign]
    with TestClient(middleware) as client:
        client.get("/")
        drain(client)
        assert ran == ["first", "follow-up"]


def test_drain_finds_the_middleware_through_litestars_test_client() -> None:
    ran: list[str] = []

    async def effect() -> None:
        ran.append("ran")

    @get("/", sync_to_thread=False)
    def endpoint(request: LitestarRequest[Any, Any, Any]) -> str:
        request.state.after_response.add(effect)
        return "ok"

    # The install the Litestar guide shows; Litestar's client wraps it in a closure.
    app = AfterResponseMiddleware(Litestar(route_handlers=[endpoint]))
    with LitestarTestClient(app) as client:
        client.get("/")
        drain(client)
        assert ran == ["ran"]


@pytest.mark.anyio
async def test_adrain_works_from_another_loop_than_the_servers() -> None:
    # A server in a thread of its own (its own loop), the test on this one: the drain runs
    # on the server's loop, and this one is woken when it is done.
    ran: list[str] = []

    async def effect() -> None:
        await anyio.sleep(0.05)
        ran.append("ran")

    app = AfterResponseMiddleware(app_adding(effect))
    async with serve_in_thread(app) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        with anyio.move_on_after(5) as waited:  # a loop nobody woke would wait all of it
            await adrain(app, timeout=60)
        assert anyio.current_time() < waited.deadline, "the drain's end did not wake this loop"
        assert ran == ["ran"]


@pytest.mark.anyio
async def test_a_drain_from_another_loop_can_be_cancelled() -> None:
    release = threading.Event()
    ran: list[str] = []

    def effect() -> None:  # in a worker thread: held until the test lets it go
        release.wait(10)
        ran.append("ran")

    app = AfterResponseMiddleware(app_adding(effect))
    async with serve_in_thread(app) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/")
        try:
            with anyio.move_on_after(0.1) as waited:
                await app.drain()  # no timeout of its own: the caller's scope ends it
            assert waited.cancelled_caught
            assert ran == [], "the drain let go while the side effect still ran"
        finally:
            release.set()


def test_drain_is_typed_for_starlettes_and_litestars_test_clients(tmp_path: Path) -> None:
    # A user's test, checked as a user's CI would check it: mypy --strict accepts both.
    from mypy import api

    test = tmp_path / "test_user.py"
    test.write_text(
        "from litestar import Litestar\n"
        "from litestar.testing import TestClient\n"
        "from starlette.testclient import TestClient as StarletteClient\n"
        "from after_response import AfterResponseMiddleware\n"
        "from after_response.testing import drain\n"
        "app = AfterResponseMiddleware(Litestar(route_handlers=[]))\n"
        "with TestClient(app) as client:\n"
        "    drain(client)\n"
        "with StarletteClient(app) as other:\n"
        "    drain(other)\n"
    )
    report, errors, status = api.run(
        ["--strict", "--cache-dir", str(tmp_path / "cache"), str(test)]
    )
    assert status == 0, report + errors
