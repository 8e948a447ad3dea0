"""One small app per framework, all with the same endpoints, for the contract tests.

Every app answers:

- ``GET /effect?id=N[&block=1]``: adds :func:`record_effect` for ``N`` and answers
  ``queued N``; with ``block=1`` the side effect waits for ``probe.gate``.
- ``GET /stream?id=N[&block=1]``: the same, answering ``streamed N`` in chunks, with the
  loop handed over between chunks (a side effect started too early would run there).
- ``GET /fail?id=N``: adds the same side effect, then answers 500 (it must be discarded).
- ``GET /raise?id=N``: adds it, then raises (the framework or server answers 500).
- ``GET /collector?id=N``: stores every way the handler can reach its collector
  (``request.state``, ``current()``, the FastAPI dependency) in ``probe.collectors[N]``.

Each app records ``app shutdown`` in its own lifespan shutdown, where it has one.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.lowlevel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from after_response import AfterResponseMiddleware, Collector

#: The frameworks with an app here: module ``{name}_app`` has ``create_app(probe, **options)``.
FRAMEWORKS: Final = ("starlette", "fastapi", "litestar", "quart", "django", "bare")


class Probe:
    """What one app under test did, in order, shared with the test that drives it."""

    def __init__(self) -> None:
        self.events: list[str] = []
        #: Side effects added with ``block=1`` wait for it; lifespan shutdown sets it.
        self.gate = anyio.Event()
        self.collectors: dict[int, tuple[object, ...]] = {}
        self._changed = anyio.Event()

    def record(self, event: str) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, event: str, timeout: float = 5) -> None:
        """Wait (at most ``timeout`` seconds) until ``event`` has been recorded."""
        with anyio.fail_after(timeout):
            while event not in self.events:
                await self._changed.wait()

    def done(self) -> list[int]:
        """The ids whose side effect finished, in order."""
        return [int(event.split()[1]) for event in self.events if event.startswith("done ")]

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """The outermost layer, next to the server: records ``chunk N`` and ``sent N`` once
        the server has taken a body chunk and the final body of request ``N``,
        ``server shutdown`` when the server asks
        for lifespan shutdown (and opens the gate), and ``shutdown complete`` when the app
        answers it."""

        async def probed(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "lifespan":
                await app(scope, _watch_shutdown(self, receive), _watch_complete(self, send))
            elif scope["type"] == "http":
                await app(scope, receive, _watch_body(self, scope, send))
            else:
                await app(scope, receive, send)

        return probed


def _watch_shutdown(probe: Probe, receive: Receive) -> Receive:
    async def receive_watching() -> Message:
        message = await receive()
        if message["type"] == "lifespan.shutdown":
            probe.record("server shutdown")
            probe.gate.set()
        return message

    return receive_watching


def _watch_complete(probe: Probe, send: Send) -> Send:
    async def send_watching(message: Message) -> None:
        if message["type"] == "lifespan.shutdown.complete":
            probe.record("shutdown complete")
        await send(message)

    return send_watching


def _watch_body(probe: Probe, scope: Scope, send: Send) -> Send:
    query = scope["query_string"].decode()
    request_id = dict(pair.split("=", 1) for pair in query.split("&") if "=" in pair).get("id")

    async def send_watching(message: Message) -> None:
        await send(message)
        if message["type"] == "http.response.body":
            more = message.get("more_body", False)
            probe.record(f"chunk {request_id}" if more else f"sent {request_id}")

    return send_watching


async def record_effect(probe: Probe, request_id: int, block: bool) -> None:
    """The side effect every app adds: records its start and its end."""
    probe.record(f"started {request_id}")
    if block:
        await probe.gate.wait()
        # Give the loop away a few times: were the app's own shutdown not waiting for
        # this task, it would get to run (and record) first.
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
    probe.record(f"done {request_id}")


async def chunks(request_id: int) -> AsyncIterator[bytes]:
    """The body of ``/stream``: ``streamed N`` in two chunks."""
    for chunk in (b"streamed ", str(request_id).encode()):
        for _ in range(3):
            await anyio.lowlevel.checkpoint()
        yield chunk


def add_effect(collector: Collector, probe: Probe, query: Mapping[str, str]) -> int:
    """Add :func:`record_effect` as the request's query asks; returns the request's id."""
    request_id = int(query["id"])
    collector.add(record_effect, probe, request_id, query.get("block") == "1")
    return request_id


@dataclass(frozen=True)
class Built:
    """An app under test, ready to serve."""

    #: What the server runs: the probe's layer outermost, then the middleware, then the app.
    app: ASGIApp
    #: Finds the middleware instance (with ``add_middleware`` it exists once the app started).
    find_middleware: Callable[[], AfterResponseMiddleware]
    #: Whether the app has a lifespan shutdown of its own (which records ``app shutdown``).
    app_lifespan: bool

    @property
    def middleware(self) -> AfterResponseMiddleware:
        return self.find_middleware()


def build(framework: str, probe: Probe, **options: Any) -> Built:
    """Build ``framework``'s app around ``probe``; ``options`` go to the middleware."""
    module = importlib.import_module(f".{framework}_app", __name__)
    built: Built = module.create_app(probe, **options)
    return built


def wrapped(app: ASGIApp, probe: Probe, *, app_lifespan: bool, **options: Any) -> Built:
    """``app`` wrapped by the middleware (and the probe), the usual install."""
    middleware = AfterResponseMiddleware(app, **options)
    return Built(probe.wrap(middleware), lambda: middleware, app_lifespan)
