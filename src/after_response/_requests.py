"""What the middleware does for a request besides watching its response: holding it at the
door under backpressure, storing its durable side effects before the response completes,
handing its tasks over (or running them inline) once the app has returned, and websockets."""

from __future__ import annotations

import logging
import math
from contextvars import Token
from typing import Any, Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import _mode
from ._collector import Collector
from ._current import current_collector
from ._errors import StoreUnavailableError
from ._executor import Executor
from ._logs import logger
from ._settings import Settings
from ._store import StoreError
from ._task import Task

#: Final messages other than ``http.response.body``, with the key that says "more follows".
OTHER_FINAL: Final = {
    "http.response.pathsend": "",
    "http.response.zerocopysend": "more_body",
    "http.response.trailers": "more_trailers",
}


def unavailable(retry_after: int) -> Message:
    """The start of a ``503`` that asks the client to try again in ``retry_after`` seconds."""
    return {
        "type": "http.response.start",
        "status": 503,
        "headers": [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"retry-after", str(retry_after).encode()),
        ],
    }


STORE_FAILED_START: Final = unavailable(1)
STORE_FAILED_BODY: Final = b"service unavailable: the request's side effects could not be stored\n"

#: Exceptions frameworks raise when the client went away (matched by name: no imports).
_CLIENT_GONE: Final = frozenset({"ClientDisconnect", "ClientDisconnected", "WebSocketDisconnect"})


class Requests:
    """The request-side work of one middleware that is not on every request's path."""

    def __init__(self, executor: Executor, settings: Settings) -> None:
        self._executor = executor
        self._settings = settings
        self._exempt_paths = frozenset(settings.exempt_paths)
        self._warned_no_lifespan = False

    async def admit(self, scope: Scope, send: Send) -> bool:
        """Backpressure: hold a new request while the queue is full, at most
        ``admission_timeout``; then answer it ``503`` with ``Retry-After`` (and ``False``)."""
        executor = self._executor
        settings = self._settings
        if not executor.saturated or scope.get("path") in self._exempt_paths:
            return True
        if await executor.wait_for_room(settings.admission_timeout):
            return True
        executor.refused += 1
        # Aggregated: this happens to every request of a flood while the queue stays full.
        method, path = scope.get("method", "-"), scope.get("path", "-")
        executor.telemetry.aggregator.emit(
            logging.WARNING,
            ("backpressure", "no room in the side-effect queue within admission_timeout"),
            "backpressure: %s %s answered 503 after waiting admission_timeout=%ss for room in "
            "the side-effect queue (max_pending=%d)",
            (method, path, settings.admission_timeout, settings.max_pending),
            {"request_method": scope.get("method"), "request_path": scope.get("path")},
            counted="503 responses from",
        )
        await send(unavailable(max(1, math.ceil(settings.admission_timeout))))
        await send({"type": "http.response.body", "body": b"busy: try again later\n"})
        return False

    async def finish(self, collector: Collector, failed: str | None) -> None:
        """After the app returned: hand over (or run) what is still held, wait for room."""
        executor = self._executor
        try:
            if collector.overflow:
                await executor.submit_waiting(collector.overflow)
            if collector.handed_over or not collector.holding:
                return
            if executor.background is not None and not _mode.inline:
                collector.hand_over(executor, failed=failed)
                if collector.overflow:
                    await executor.submit_waiting(collector.overflow)
                return
            if not self._warned_no_lifespan and not _mode.inline:
                self._warned_no_lifespan = True
                logger.warning(
                    "AfterResponseMiddleware got a request before lifespan startup (is the "
                    "server running with lifespan off, as `uvicorn --lifespan off` does?). Side "
                    "effects still run, after each response, but inside the request's own ASGI "
                    "call, so the server's graceful shutdown waits for them; shutdown_timeout "
                    "does not apply. Enable lifespan to give them a shared executor and a "
                    "bounded drain."
                )
            await collector.run_inline(failed=failed)
        finally:
            collector.overflow = None
            collector.close(failed)

    def finish_cancelled(self, collector: Collector, failed: str | None) -> None:
        """The request's call was cancelled: nothing here may await."""
        executor = self._executor
        if collector.overflow:
            executor.shed(collector.overflow, "its request was cancelled while it waited")
            collector.overflow = None
        if collector.holding:
            if executor.background is not None:
                # The handler already decided these; the cancellation (often a client that
                # went away) does not undo that.
                collector.hand_over(executor, failed=failed)
                if collector.overflow:
                    executor.shed(collector.overflow, "its request was cancelled")
                    collector.overflow = None
            else:
                collector.abandon("its request's ASGI call was cancelled before they could run")
        collector.close(failed)

    async def websocket(
        self,
        app: ASGIApp,
        scope: Scope,
        receive: Receive,
        send: Send,
        collector: Collector,
        token: Token[Any],
    ) -> None:
        """A websocket's tasks run once its call has returned (there is no final message)."""
        client_gone = False

        async def receive_watching() -> Message:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "websocket.disconnect":
                client_gone = True
            return message

        try:
            await app(scope, receive_watching, send)
        except Exception as exc:
            current_collector.reset(token)
            failed = None
            if not (client_gone or client_left(exc)):
                failed = f"the app raised {type(exc).__qualname__}"
            await self._store_websocket(collector, failed)
            await self.finish(collector, failed)
            raise
        except BaseException:
            current_collector.reset(token)
            self.finish_cancelled(collector, None)
            raise
        current_collector.reset(token)
        await self._store_websocket(collector, None)
        await self.finish(collector, None)

    async def _store_websocket(self, collector: Collector, failed: str | None) -> None:
        """A websocket has no response to complete: its durable tasks are stored when its
        call ends, before they are handed over. Those the store refuses never run."""
        refused = await save_unsaved(self._executor, collector, failed=failed is not None)
        if refused is not None:
            tasks, exc = refused
            collector.forget(set(tasks))
            self._executor.not_stored(tasks, exc)


async def save_unsaved(
    executor: Executor, collector: Collector, *, failed: bool
) -> tuple[list[Task], StoreError] | None:
    """Store the request's unsaved durable tasks (of a ``failed`` request, only its
    ``run_on_error`` ones: the others are discarded with the request's other tasks);
    those deduplicated by key are no longer held. ``None`` once stored, else the tasks the
    store refused and its error."""
    tasks = collector.take_unsaved()
    if failed:
        tasks = [task for task in tasks if task.record.run_on_error]
    if not tasks:
        return None
    try:
        deduplicated = await executor.save(tasks)
    except StoreError as exc:
        return tasks, exc
    if deduplicated:
        collector.forget(deduplicated)
    return None


async def store_durable(executor: Executor, collector: Collector, status: int) -> bool:
    """Store the request's unsaved durable tasks before its response (a 5xx stores only
    its ``run_on_error`` ones); ``False`` if the store failed (logged)."""
    refused = await save_unsaved(executor, collector, failed=status >= 500)
    if refused is None:
        return True
    tasks, exc = refused
    method, path = collector.request
    # One line per interval while the store is broken, the others counted.
    executor.telemetry.aggregator.emit(
        logging.ERROR,
        ("the durable store", "response became a 503"),
        "after-response could not store %d durable side effect(s) of %s %s, so the "
        "response is a 503 (never a complete response for a side effect that was not "
        "stored): %s",
        (len(tasks), method, path, exc),
        {"request_method": method, "request_path": path, "error_type": type(exc).__qualname__},
        counted="failures of",
    )
    return False


def storing_send(executor: Executor, collector: Collector, send: Send) -> Send:
    """The ``send`` an app gets when a store is configured: stores the request's durable
    side effects before the client can hold a response that promises them (before the
    response starts, and before its last message), and turns the response into a ``503``
    when the store fails. ``send`` is the middleware's watching send. Without a store the
    app gets that one directly: requests that cannot add durable tasks pay nothing here."""
    status = 0
    trailers = refused = False

    async def send_storing(message: Message) -> None:
        nonlocal status, trailers, refused
        kind = message["type"]
        starting = kind == "http.response.start"
        if starting:  # kept even with nothing unsaved: a durable add may come mid-stream
            status = message["status"]
            trailers = message.get("trailers", False)
        if refused or collector.unsaved:
            final = is_final(kind, message, trailers)
            if refused:  # the response became a 503: the app's own messages go nowhere
                if final:
                    await send({"type": "http.response.body", "body": STORE_FAILED_BODY})
                return
            if (final or starting) and not await store_durable(executor, collector, status):
                if not starting:
                    raise StoreUnavailableError(
                        "a durable side effect added while the response streamed could not "
                        "be stored: the response is not completed"
                    )
                refused = True
                await send(STORE_FAILED_START)
                return
        await send(message)

    return send_storing


def client_left(raised: Exception) -> bool:
    """Whether ``raised`` says the client went away (the handler's decisions stand)."""
    return isinstance(raised, OSError) or type(raised).__name__ in _CLIENT_GONE


def is_final(kind: str, message: Message, trailers: bool) -> bool:
    """Whether ``message`` is the response's last."""
    if kind == "http.response.body":
        return not (trailers or message.get("more_body", False))
    if kind == "http.response.start":
        return False
    return kind in OTHER_FINAL and not message.get(OTHER_FINAL[kind], False)


def verdict(status: int, client_gone: bool) -> str | None:
    """Why a request whose app has returned discards its tasks (a 5xx, or no response and
    the client still there), or ``None``."""
    if status == 0 and not client_gone:
        return "the app returned without sending a response"
    return status_failure(status)


def status_failure(status: int) -> str | None:
    """Why a response with this status discards its tasks, or ``None``."""
    return f"the response status was {status}" if status >= 500 else None
