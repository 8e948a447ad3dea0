"""The ASGI middleware: puts a collector on each request, hands its tasks over once the
response is complete, and ties the executor's lifetime to the server's lifespan."""

from __future__ import annotations

from typing import Any, Final

import anyio
from anyio.abc import TaskGroup
from opentelemetry import metrics, trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._collector import Collector, _current
from ._executor import DeadLetterHook, Defaults, Executor, Stats
from ._job import RequestInfo
from ._options import Retry, check_timeout
from ._telemetry import Telemetry, logger

_FINAL_UNLESS_MORE: Final = {
    "http.response.body": "more_body",
    "http.response.zerocopysend": "more_body",
    "http.response.trailers": "more_trailers",
}


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
        on_dead_letter: ``hook(task_name, exception, attempts)``, called for each task that
            ends without success: failed or timed out after its last attempt, shed, or
            abandoned at shutdown. Keep it quick and synchronous.
        tracer_provider: OpenTelemetry tracer provider (default: the global one).
        meter_provider: OpenTelemetry meter provider (default: the global one).
        state_key: the name of the collector on ``request.state``.

    Raises:
        ValueError, TypeError: when an option is out of range or of the wrong type.
    """

    def __init__(
        self,
        app: ASGIApp,
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
        if on_dead_letter is not None and not callable(on_dead_letter):
            raise TypeError(f"on_dead_letter must be callable or None, got {on_dead_letter!r}")
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
            defaults=Defaults(timeout=task_timeout, retry=retry, run_on_error=run_on_error),
        )
        self._warned_no_lifespan = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type == "http" or scope_type == "websocket":
            await self._request(scope, receive, send)
        elif scope_type == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every task added so far has ended (succeeded, failed, timed out,
        discarded, shed or abandoned). Returns ``False`` if ``timeout`` seconds passed first.

        Do not await it inside a request handler for that request's own tasks: they only
        start once the response is complete.
        """
        check_timeout("timeout", timeout)
        return await self._executor.drain(timeout)

    def stats(self) -> Stats:
        """Live counts: added, collected, pending, running, and each terminal outcome."""
        return self._executor.stats()

    # -- requests ----------------------------------------------------------------------------

    async def _request(self, scope: Scope, receive: Receive, send: Send) -> None:
        executor = self._executor
        is_http = scope["type"] == "http"
        collector = Collector(
            executor, RequestInfo(scope.get("method", "WEBSOCKET"), scope.get("path", ""))
        )
        # A new state dict: a server that shares one between requests must not see ours.
        state = scope.get("state")
        scope["state"] = (
            {**state, self.state_key: collector} if state else {self.state_key: collector}
        )
        overflow: list[Any] = []
        trailers = False

        async def receive_watching() -> Message:
            message = await receive()
            if message["type"] in ("http.disconnect", "websocket.disconnect"):
                collector.client_gone = True
            return message

        async def send_watching(message: Message) -> None:
            nonlocal trailers
            kind = message["type"]
            if kind == "http.response.start":
                collector.status = message["status"]
                trailers = message.get("trailers", False)
            try:
                await send(message)
            except OSError:
                collector.client_gone = True
                raise
            more = _FINAL_UNLESS_MORE.get(kind)
            if (
                (more is not None and not message.get(more, False))
                or kind == "http.response.pathsend"
            ) and (kind == "http.response.trailers" or not trailers):
                # The server has the whole response: the request's tasks may start now.
                collector.response_complete = True
                if executor.background is not None:
                    overflow.extend(collector.hand_over(failed=_http_failure(collector, None)))

        token = _current.set(collector)
        try:
            await self.app(scope, receive_watching, send_watching if is_http else send)
        except Exception as exc:
            _current.reset(token)
            await self._finish(collector, overflow, exc, is_http)
            raise
        except BaseException:
            _current.reset(token)
            self._finish_cancelled(collector)
            raise
        _current.reset(token)
        await self._finish(collector, overflow, None, is_http)

    async def _finish(
        self, collector: Collector, overflow: list[Any], raised: Exception | None, is_http: bool
    ) -> None:
        executor = self._executor
        if overflow:
            await executor.admit_waiting(overflow, None)
        if collector.handed_over or not len(collector):
            return
        failed = (
            _http_failure(collector, raised) if is_http else _websocket_failure(collector, raised)
        )
        if executor.background is not None:
            overflow = collector.hand_over(failed=failed)
            if overflow:
                await executor.admit_waiting(overflow, None)
            return
        if not self._warned_no_lifespan:
            self._warned_no_lifespan = True
            logger.warning(
                "AfterResponseMiddleware got a request before lifespan startup (is the server "
                "running with lifespan off, as `uvicorn --lifespan off` does?). Side effects "
                "still run, after each response, but inside the request's own ASGI call, so "
                "the server's graceful shutdown waits for them; shutdown_timeout does not "
                "apply. Enable lifespan to give them a shared executor and a bounded drain."
            )
        await collector.run_inline(failed=failed)

    def _finish_cancelled(self, collector: Collector) -> None:
        """The request's call was cancelled: nothing here may await."""
        if not len(collector):
            return
        failed = _http_failure(collector, None) if collector.status else None
        if self._executor.background is not None:
            # The handler already decided these; the cancellation (often a client that
            # went away) does not undo that.
            self._executor.shed(collector.hand_over(failed=failed))
        else:
            collector.abandon("its request's ASGI call was cancelled before they could run")

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


def _http_failure(collector: Collector, raised: Exception | None) -> str | None:
    """Why the request counts as failed (its tasks are discarded), or ``None``."""
    if collector.status >= 500:
        return f"the response status was {collector.status}"
    if collector.response_complete or collector.client_gone:
        return None  # the handler decided its side effects; the client leaving does not undo it
    if raised is not None:
        return f"the app raised {type(raised).__qualname__}"
    if collector.status == 0:
        return "the app returned without sending a response"
    return None


def _websocket_failure(collector: Collector, raised: Exception | None) -> str | None:
    if raised is not None and not collector.client_gone:
        return f"the app raised {type(raised).__qualname__}"
    return None


def _check_count(what: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {value}")
