"""Test helpers for apps that use after-response, and their pytest plugin.

Three ways to test a handler's side effects, in a sync test with Starlette's ``TestClient``
or an async one with ``httpx.AsyncClient``:

- **wait for them**: ``drain(client)`` (sync) or ``await adrain(app)`` (async) returns once
  the side effects of the requests made so far have ended;
- **capture them**: inside ``with capture() as calls:`` side effects are recorded (name,
  function, arguments) and not run, to assert what a handler scheduled;
- **run them inline**: inside ``with run_inline():`` each request's side effects run inside
  its own ASGI call, so they are done when the client has the response.

With pytest, the plugin :mod:`after_response.pytest_plugin` (registered on install) gives
the fixtures ``after_response_calls`` (capture) and ``after_response_inline`` for one test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import anyio

from . import _mode
from ._middleware import AfterResponseMiddleware
from ._mode import CapturedCall

__all__ = [
    "CapturedCall",
    "CapturedCalls",
    "adrain",
    "capture",
    "drain",
    "find_middlewares",
    "run_inline",
]


class _ClientWithApp(Protocol):
    """A test client with the ASGI app it calls: Starlette's ``TestClient``, Litestar's."""

    @property
    def app(self) -> Any: ...


class CapturedCalls(list[CapturedCall]):
    """The side effects added while capturing, in the order they were added."""

    @property
    def names(self) -> list[str]:
        """Their task names."""
        return [call.name for call in self]

    def to(self, fn: Callable[..., Any]) -> list[CapturedCall]:
        """The calls of ``fn``."""
        return [call for call in self if call.fn == fn]


@contextlib.contextmanager
def capture() -> Iterator[CapturedCalls]:
    """Record side effects instead of running them, for the duration of the block::

        with capture() as calls:
            client.post("/login", json={"email": "ada@example.com"})
        [email] = calls.to(send_verification_email)
        assert email.args == ("ada@example.com", ANY)

    ``add()`` still checks its arguments against the function's signature; the recorded
    calls are never counted in ``stats()``. A call is recorded as ``add()`` is called, so
    the calls of a request that then fails are recorded too (the middleware would discard
    all but its ``run_on_error`` ones).
    """
    if _mode.captured is not None:
        raise RuntimeError("capture() is already active: capturing blocks do not nest")
    calls = CapturedCalls()
    _mode.captured = calls
    try:
        yield calls
    finally:
        _mode.captured = None


@contextlib.contextmanager
def run_inline() -> Iterator[None]:
    """Run each request's side effects inside its own ASGI call, for the duration of the
    block: when the client has the response, they have run (as without lifespan)."""
    previous, _mode.inline = _mode.inline, True
    try:
        yield
    finally:
        _mode.inline = previous


def find_middlewares(app: object) -> list[AfterResponseMiddleware]:
    """The ``AfterResponseMiddleware`` instances inside ``app``: the app itself, or reached
    through the ``app`` and ``middleware_stack`` attributes that Starlette, FastAPI and
    most ASGI middlewares use, and through the variables of a function that wraps an app
    (Litestar's ``TestClient`` wraps one that is not a Litestar app in a closure)."""
    found: list[AfterResponseMiddleware] = []
    seen: set[int] = set()
    layer: list[object] = [app]
    for _ in range(64):
        following: list[object] = []
        for obj in layer:
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, AfterResponseMiddleware):
                found.append(obj)
            following += [getattr(obj, "middleware_stack", None), getattr(obj, "app", None)]
            following += _wrapped_by(obj)
        if not following:
            break
        layer = following
    return found


def drain(client: _ClientWithApp, timeout: float = 5.0) -> None:
    """Wait until the side effects of the requests ``client`` made so far have ended, and
    those they added in turn (follow-ups added with ``current().add()``).

    For Starlette's ``TestClient`` (or Litestar's) used as a context manager (so lifespan
    runs)::

        with TestClient(app) as client:
            client.post("/login")
            drain(client)
        assert sent == ["ada@example.com"]

    Raises:
        LookupError: no ``AfterResponseMiddleware`` is reachable from ``client.app``.
        RuntimeError: the client is not open (use ``with TestClient(app) as client:``).
        TimeoutError: they had not ended after ``timeout`` seconds.
    """
    middlewares = _middlewares_of(client.app)
    portal = getattr(client, "portal", None)
    if not hasattr(portal, "call"):  # Litestar's: a method; its open portal has this name
        portal = getattr(client, "blocking_portal", None)
    if portal is None:
        raise RuntimeError(
            "drain(client) needs an open TestClient: use `with TestClient(app) as client:` "
            "(which also runs lifespan, so side effects have their executor)"
        )
    for middleware in middlewares:
        portal.call(_drain_all, middleware, timeout)


async def adrain(app: object, timeout: float = 5.0) -> None:
    """``drain()`` for async tests: wait until the side effects of the requests made so far
    to ``app`` (an ASGI app containing ``AfterResponseMiddleware``) have ended, and those
    they added in turn. From the server's loop, or another one (a server in a thread).

    Raises:
        LookupError: no ``AfterResponseMiddleware`` is reachable from ``app``.
        TimeoutError: they had not ended after ``timeout`` seconds.
    """
    for middleware in _middlewares_of(app):
        await _drain_all(middleware, timeout)


async def _drain_all(middleware: AfterResponseMiddleware, timeout: float) -> None:
    """Drain until nothing is outstanding: ``middleware.drain()`` waits for the tasks added
    before it, and a side effect may add a follow-up while it runs."""
    deadline = anyio.current_time() + timeout
    while True:
        left = deadline - anyio.current_time()
        if left <= 0 or not await middleware.drain(left):
            raise TimeoutError(f"side effects still running after {timeout}s: {middleware.stats()}")
        stats = middleware.stats()
        if stats.added == stats.finished:
            return


def _wrapped_by(obj: object) -> list[object]:
    """What a function (or a bound method) closes over that can be called: the app a
    wrapping function calls."""
    function = getattr(obj, "__func__", obj)
    values: list[object] = []
    for cell in getattr(function, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(value):
            values.append(value)
    return values


def _middlewares_of(app: object) -> list[AfterResponseMiddleware]:
    middlewares = find_middlewares(app)
    if not middlewares:
        raise LookupError(
            f"no AfterResponseMiddleware found in {type(app).__qualname__}: install it "
            "(app.add_middleware(AfterResponseMiddleware), or app = AfterResponseMiddleware(app)); "
            "with Starlette's add_middleware, make one request first (the middleware stack is "
            "built on the first call)"
        )
    return middlewares
