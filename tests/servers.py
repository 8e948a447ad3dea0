"""Run an ASGI app under a real server on 127.0.0.1, in the test's own event loop.

In-process servers let a test await ``middleware.drain()`` and read ``stats()`` directly,
while the client still talks real HTTP over a real socket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import uvicorn
from starlette.types import ASGIApp


def bound_socket() -> socket.socket:
    """A listening-ready TCP socket on a free port of 127.0.0.1."""
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections accepted from a
    # socket whose proto says TCP; without it Nagle and delayed ACKs stall small responses.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.set_inheritable(True)
    return sock


class _Uvicorn(uvicorn.Server):
    """A uvicorn server that reports readiness on an event and leaves signals alone."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = anyio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@asynccontextmanager
async def serve_uvicorn(
    app: ASGIApp, *, lifespan: str = "on", **options: Any
) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn; yields its base URL; shuts down gracefully on exit."""
    sock = bound_socket()
    config = uvicorn.Config(app, lifespan=lifespan, log_level="warning", **options)
    server = _Uvicorn(config)
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(server.serve, [sock])
        with anyio.fail_after(10):
            await server.ready.wait()
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
    sock.close()


class _ThreadedUvicorn(_Uvicorn):
    """A uvicorn server on a thread of its own, reporting readiness across threads."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.serving = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.serving.set()


@asynccontextmanager
async def serve_in_thread(app: ASGIApp) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a thread of its own, so its event loop is not the
    test's (as with a server the test did not start); yields its base URL."""
    sock = bound_socket()
    server = _ThreadedUvicorn(uvicorn.Config(app, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        if not await anyio.to_thread.run_sync(server.serving.wait, 10):
            raise RuntimeError("uvicorn did not start within 10 s")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await anyio.to_thread.run_sync(thread.join, 10)
        sock.close()


@asynccontextmanager
async def serve_uvicorn_uvloop(app: ASGIApp, **options: Any) -> AsyncIterator[str]:
    """Serve ``app`` as ``uvicorn[standard]`` does: httptools on uvloop.

    In-process, uvicorn runs in the test's own loop (its ``loop`` option only applies when
    uvicorn starts the loop itself), so the test's loop must be uvloop: an ``anyio_backend``
    of ``("asyncio", {"use_uvloop": True})``.
    """
    loop = type(asyncio.get_running_loop())
    if loop.__module__.partition(".")[0] != "uvloop":
        raise RuntimeError(
            f"serve_uvicorn_uvloop needs the test to run on uvloop, not {loop.__qualname__}: "
            'give the test anyio_backend = ("asyncio", {"use_uvloop": True})'
        )
    async with serve_uvicorn(app, loop="uvloop", http="httptools", **options) as url:
        yield url


@asynccontextmanager
async def serve_hypercorn(app: ASGIApp, **options: Any) -> AsyncIterator[str]:
    """Serve ``app`` with hypercorn (asyncio worker); yields its base URL."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    sock = bound_socket()
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.loglevel = "WARNING"
    config.graceful_timeout = 30
    for name, value in options.items():
        setattr(config, name, value)
    shutdown = anyio.Event()
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(_hypercorn_serve, serve, app, config, shutdown.wait)
        base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        await _wait_until_listening(sock.getsockname()[1])
        try:
            yield base_url
        finally:
            shutdown.set()


async def _hypercorn_serve(
    serve: Callable[..., Any], app: ASGIApp, config: Any, trigger: Callable[[], Any]
) -> None:
    await serve(app, config, shutdown_trigger=trigger)


async def _wait_until_listening(port: int) -> None:
    """Connect until the server accepts (bounded): hypercorn has no readiness hook."""
    with anyio.fail_after(10):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.02)
                continue
            await stream.aclose()
            return


SERVERS: dict[str, Callable[..., Any]] = {
    "uvicorn": serve_uvicorn,
    "hypercorn": serve_hypercorn,
}


@asynccontextmanager
async def serve_granian(
    app: ASGIApp, *, lifespan: str = "on", **options: Any
) -> AsyncIterator[str]:
    """Serve ``app`` with granian's embedded server, in this event loop; yields its base URL.

    ``granian.server.embed`` (granian 2.x, marked experimental by granian) runs the Rust
    HTTP runtime on its own threads and the ASGI app on the current asyncio loop, so the
    test can still await ``drain()`` and read ``stats()``. Stopping it runs lifespan
    shutdown, as SIGTERM does for ``granian --interface asgi``.
    """
    from granian.constants import Interfaces
    from granian.server.embed import Server

    # Granian binds the address itself: borrow a free port.
    with bound_socket() as free:
        port = free.getsockname()[1]
    interface = Interfaces.ASGI if lifespan == "on" else Interfaces.ASGINL
    server = Server(
        app, address="127.0.0.1", port=port, interface=interface, log_enabled=False, **options
    )
    with anyio.CancelScope() as shutdown_bound:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(server.serve)
            await _wait_until_listening(port)
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                server.stop()  # type: ignore[no-untyped-call]
                # Granian waits for its worker without a deadline: bound the wait here.
                shutdown_bound.deadline = anyio.current_time() + 30
    if shutdown_bound.cancelled_caught:
        raise TimeoutError("granian did not shut down within 30 s")


SERVERS["granian"] = serve_granian

#: Servers that share the test's event loop and need it to be uvloop.
UVLOOP_SERVERS: dict[str, Callable[..., Any]] = {"uvicorn-uvloop": serve_uvicorn_uvloop}


async def websocket_round_trip(stream: Any) -> None:
    """A minimal WebSocket client on ``stream`` (to ``/ws``): handshake, read one frame,
    send one, close."""
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send(
        (
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive()
    assert b" 101 " in data.split(b"\r\n", 1)[0]
    rest = data.split(b"\r\n\r\n", 1)[1]
    while len(rest) < 4:
        rest += await stream.receive()
    mask = os.urandom(4)
    payload = b"bye"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    await stream.send(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    await stream.receive()  # the server's close frame
    await stream.aclose()
