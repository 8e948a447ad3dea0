"""The lifespan protocol: the executor starts with the server's lifespan startup and drains at
its shutdown, whether or not the wrapped app speaks the protocol itself.

If the executor cannot start (its store cannot be opened), the middleware answers
``lifespan.startup.failed`` itself, so that the server exits instead of taking the error for
"lifespan unsupported" and serving without it."""

from __future__ import annotations

import anyio
from anyio.abc import TaskGroup
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._executor import Executor
from ._logs import logger


async def serve_lifespan(
    app: ASGIApp,
    executor: Executor,
    shutdown_timeout: float | None,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """Pass the lifespan call to ``app``, starting ``executor`` at startup and stopping it
    (draining for at most ``shutdown_timeout``) before the app's own shutdown."""
    startup_received = False
    error: Exception | None = None

    async with anyio.create_task_group() as task_group:

        async def receive_lifespan() -> Message:
            nonlocal startup_received
            message = await receive()
            if message["type"] == "lifespan.startup":
                startup_received = True
                await _start(executor, task_group, send)
            elif message["type"] == "lifespan.shutdown":
                # Drain before the app shuts down: side effects may need its clients.
                await executor.stop(shutdown_timeout)
            return message

        try:
            try:
                await app(scope, receive_lifespan, send)
            except Exception as exc:
                if startup_received:
                    raise
                logger.info(
                    "the wrapped app does not support the lifespan protocol (it raised %s "
                    "before reading lifespan.startup); AfterResponseMiddleware answers it",
                    type(exc).__qualname__,
                )
                await _answer_lifespan(executor, shutdown_timeout, receive, send, task_group)
        except Exception as exc:
            # Raised outside the task group, so the server sees the error itself (the app's
            # own, or the middleware's failed startup) rather than an exception group.
            error = exc
        finally:
            with anyio.CancelScope(shield=True):
                await executor.stop(shutdown_timeout)
    if error is not None:
        raise error


async def _answer_lifespan(
    executor: Executor,
    shutdown_timeout: float | None,
    receive: Receive,
    send: Send,
    task_group: TaskGroup,
) -> None:
    """Speak the lifespan protocol for an app that does not."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await _start(executor, task_group, send)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await executor.stop(shutdown_timeout)
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _start(executor: Executor, task_group: TaskGroup, send: Send) -> None:
    """Start ``executor`` in ``task_group``; if it cannot start, tell the server (before
    raising), since a server in lifespan mode "auto" takes an exception alone for "lifespan
    unsupported" and would serve on without the executor."""
    try:
        await task_group.start(executor.serve)
    except Exception as exc:
        # The error's own message: a store's names the file and what to do, never a task's
        # arguments. Some servers (hypercorn) raise from this send; their error ends the call.
        message = f"AfterResponseMiddleware could not start: {type(exc).__qualname__}: {exc}"
        await send({"type": "lifespan.startup.failed", "message": message})
        raise
