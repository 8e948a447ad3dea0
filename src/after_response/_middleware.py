"""The ASGI middleware: puts a collector on each request, hands its tasks over once the
response is complete, and ties the executor's lifetime to the server's lifespan."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import Token
from typing import Any, Final

import anyio
from anyio.abc import TaskGroup
from opentelemetry import metrics, trace
from starlette.types import Message, Receive, Scope, Send

from ._accounting import Stats
from ._collector import Collector, _current
from ._dead_letters import DeadLetterHook, check_hook
from ._executor import Executor
from ._logs import logger
from ._options import NO_RETRY, Resolved, Retry, check_timeout
from ._telemetry import Telemetry

#: Final messages other than ``http.response.body``, with the key that says "more follows".
_OTHER_FINAL: Final = {
    "http.response.pathsend": "",
    "http.response.zerocopysend": "more_body",
    "http.response.trailers": "more_trailers",
}

#: Any ASGI 3 application. Loosely typed on purpose: Litestar, Quart and Django type their
#: scopes and messages as TypedDicts, which Starlette's ``MutableMapping``-based ``ASGIApp``
#: does not accept, and users should not need a ``cast`` to wrap them.
AnyASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class AfterResponseMiddleware:
    """Run each request's side effects after its response has been sent.

    Install it outermost (or at least outside any ``BaseHTTPMiddleware``, which would
    buffer the "final" body before the client has it)::

        app = AfterResponseMiddleware(app)
        # or, in Starlette and FastAPI:
        app.add_middleware(AfterResponseMiddleware)

    Args:
        app: the ASGI application to wrap.
        max_concurrency: tasks running at once, across all requests (exact bound).
        max_pending: tasks queued (or waiting to retry) at most; beyond it a request's call
            waits for room after its response is sent, up to ``overflow_timeout``, then
            the rest of its tasks are shed (logged, counted, dead-lettered).
        overflow_timeout: seconds a request's call waits for room in the queue; ``None``
            waits as long as it takes.
        task_timeout: default seconds an attempt may run before it is cancelled; ``None``
            for no limit.
        retry: default :class:`Retry` policy; ``None`` (default) runs each task once.
        shutdown_timeout: seconds lifespan shutdown waits for tasks before abandoning
            them; ``None`` waits for all of them.
        run_on_error: run tasks even when the app raised or answered 5xx (by default they
            are discarded, and logged with their names).
        max_threads: worker threads for sync side effects; a pool of their own, so slow
            sync side effects never starve the app's own threadpool.
        on_dead_letter: ``hook(dead_letter)``, called with a :class:`DeadLetter` for each
            task that ends without success: failed or timed out after its last attempt,
            shed, or abandoned. A plain function: it runs in a thread of its own, off the
            event loop, one dead letter after another.
        tracer_provider: OpenTelemetry tracer provider (default: the global one).
        meter_provider: OpenTelemetry meter provider (default: the global one).
        state_key: the name of the collector on ``request.state``.

    Raises:
        ValueError, TypeError: when an option is out of range or of the wrong type.
    """

    def __init__(
        self,
        app: AnyASGIApp,
        *,
        max_concurrency: int = 100,
        max_pending: int = 10_000,
        overflow_timeout: float | None = 5.0,
        task_timeout: float | None = 60.0,
        retry: Retry | None = None,
        shutdown_timeout: float | None = 20.0,
        run_on_error: bool = False,
        max_threads: int = 40,
        on_dead_letter: DeadLetterHook | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        state_key: str = "after_response",
    ) -> None:
        _check_count("max_concurrency", max_concurrency, minimum=1)
        _check_count("max_pending", max_pending, minimum=0)
        _check_count("max_threads", max_threads, minimum=1)
        check_timeout("overflow_timeout", overflow_timeout)
        check_timeout("task_timeout", task_timeout)
        check_timeout("shutdown_timeout", shutdown_timeout)
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(f"retry must be a Retry(...) or None, got {retry!r}")
        if not isinstance(run_on_error, bool):
            raise TypeError(f"run_on_error must be True or False, got {run_on_error!r}")
        check_hook(on_dead_letter)
        if not isinstance(state_key, str) or not state_key:
            raise TypeError(f"state_key must be a non-empty string, got {state_key!r}")
        self.app = app
        self.shutdown_timeout = shutdown_timeout
        self.state_key = state_key
        self._executor = Executor(
            max_concurrency=max_concurrency,
            max_pending=max_pending,
            overflow_timeout=overflow_timeout,
            max_threads=max_threads,
            on_dead_letter=on_dead_letter,
            telemetry=Telemetry(tracer_provider, meter_provider),
            defaults=Resolved("", task_timeout, retry or NO_RETRY, run_on_error),
        )
        self._warned_no_lifespan = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Parameters typed Any for the reason given at AnyASGIApp: the middleware must be
        # assignable wherever any framework expects its own ASGI callable type.
        scope_type = scope["type"]
        if scope_type != "http" and scope_type != "websocket":
            if scope_type == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return

        # The per-request hot path: a request that adds nothing costs a collector, a state
        # dict, a context variable and a send wrapper, and nothing else.
        executor = self._executor
        collector = Collector(executor, scope.get("method", "WEBSOCKET"), scope.get("path", ""))
        # A new state dict: a server that shares one between requests must not see ours.
        state = scope.get("state")
        scope["state"] = (
            {**state, self.state_key: collector} if state else {self.state_key: collector}
        )
        token = _current.set(collector)
        if scope_type == "websocket":
            await self._websocket(scope, receive, send, collector, token)
            return

        status = 0
        trailers = complete = client_gone = False

        async def send_watching(message: Message) -> None:
            nonlocal status, trailers, complete, client_gone
            try:
                await send(message)
            except OSError:
                client_gone = True
                raise
            kind = message["type"]
            if kind == "http.response.body":
                if trailers or message.get("more_body", False):
                    return
            elif kind == "http.response.start":
                status = message["status"]
                trailers = message.get("trailers", False)
                return
            elif kind not in _OTHER_FINAL or message.get(_OTHER_FINAL[kind], False):
                return
            # The server has the whole response: the request's tasks may start now.
            complete = True
            if collector.holding and executor.background is not None:
                collector.hand_over(executor, failed=_status_failure(status))

        try:
            await self.app(scope, receive, send_watching)
        except Exception as exc:
            _current.reset(token)
            if complete or client_gone or _client_left(exc):
                failed = _status_failure(status)
            else:
                failed = f"the app raised {type(exc).__qualname__}"
            await self._finish(collector, failed)
            raise
        except BaseException:
            _current.reset(token)
            self._finish_cancelled(collector, _status_failure(status))
            raise
        _current.reset(token)
        if status == 0 and not client_gone:
            failed = "the app returned without sending a response"
        else:
            failed = _status_failure(status)
        if collector.holding or collector.overflow:
            await self._finish(collector, failed)
        collector.close(failed)  # late adds follow the request's verdict

    async def _websocket(
        self, scope: Scope, receive: Receive, send: Send, collector: Collector, token: Token[Any]
    ) -> None:
        client_gone = False

        async def receive_watching() -> Message:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "websocket.disconnect":
                client_gone = True
            return message

        try:
            await self.app(scope, receive_watching, send)
        except Exception as exc:
            _current.reset(token)
            if client_gone or _client_left(exc):
                await self._finish(collector, None)
            else:
                await self._finish(collector, f"the app raised {type(exc).__qualname__}")
            raise
        except BaseException:
            _current.reset(token)
            self._finish_cancelled(collector, None)
            raise
        _current.reset(token)
        await self._finish(collector, None)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every task added before this call has ended (succeeded, failed,
        timed out, discarded, shed or abandoned). Returns ``False`` if ``timeout`` seconds
        passed first. Tasks added after the call are not waited for, so it returns under
        steady load too (shutdown, by contrast, waits for everything).

        Do not await it inside a request handler for that request's own tasks: they only
        start once the response is complete.
        """
        check_timeout("timeout", timeout)
        return await self._executor.drain(timeout)

    def stats(self) -> Stats:
        """Live counts: added, collected, pending, running, and each terminal outcome."""
        return self._executor.stats()

    # -- requests ----------------------------------------------------------------------------

    async def _finish(self, collector: Collector, failed: str | None) -> None:
        """After the app returned: hand over (or run) what is still held, wait for room."""
        executor = self._executor
        try:
            if collector.overflow:
                await executor.submit_waiting(collector.overflow)
            if collector.handed_over or not collector.holding:
                return
            if executor.background is not None:
                collector.hand_over(executor, failed=failed)
                if collector.overflow:
                    await executor.submit_waiting(collector.overflow)
                return
            if not self._warned_no_lifespan:
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

    def _finish_cancelled(self, collector: Collector, failed: str | None) -> None:
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

    # -- lifespan ----------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        executor = self._executor
        startup_received = False
        error: Exception | None = None

        async with anyio.create_task_group() as task_group:

            async def receive_lifespan() -> Message:
                nonlocal startup_received
                message = await receive()
                if message["type"] == "lifespan.startup":
                    startup_received = True
                    await task_group.start(executor.serve)
                elif message["type"] == "lifespan.shutdown":
                    # Drain before the app shuts down: side effects may need its clients.
                    await executor.stop(self.shutdown_timeout)
                return message

            try:
                await self.app(scope, receive_lifespan, send)
            except Exception as exc:
                if startup_received:
                    # Raised outside the task group, so the server sees the app's own error
                    # rather than an exception group.
                    error = exc
                else:
                    logger.info(
                        "the wrapped app does not support the lifespan protocol (it raised %s "
                        "before reading lifespan.startup); AfterResponseMiddleware answers it",
                        type(exc).__qualname__,
                    )
                    await self._answer_lifespan(receive, send, task_group)
            finally:
                with anyio.CancelScope(shield=True):
                    await executor.stop(self.shutdown_timeout)
        if error is not None:
            raise error

    async def _answer_lifespan(self, receive: Receive, send: Send, task_group: TaskGroup) -> None:
        """Speak the lifespan protocol for an app that does not."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await task_group.start(self._executor.serve)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._executor.stop(self.shutdown_timeout)
                await send({"type": "lifespan.shutdown.complete"})
                return


#: Exceptions frameworks raise when the client went away (matched by name: no imports).
_CLIENT_GONE: Final = frozenset({"ClientDisconnect", "ClientDisconnected", "WebSocketDisconnect"})


def _client_left(raised: Exception) -> bool:
    """Whether ``raised`` says the client went away (the handler's decisions stand)."""
    return isinstance(raised, OSError) or type(raised).__name__ in _CLIENT_GONE


def _status_failure(status: int) -> str | None:
    """Why a response with this status discards its tasks, or ``None``."""
    return f"the response status was {status}" if status >= 500 else None


def _check_count(what: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {value}")
