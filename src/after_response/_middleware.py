"""The ASGI middleware: puts a collector on each request, hands its tasks over once the
response is complete, and ties the executor's lifetime to the server's lifespan."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any

from opentelemetry import metrics, trace
from starlette.types import Message

from . import _mode
from ._accounting import Stats
from ._checks import check_seconds
from ._collector import Collector
from ._current import current_collector
from ._dead_letters import DeadLetterHook
from ._engine import Engine
from ._executor import Executor
from ._lifespan import serve_lifespan
from ._options import NO_RETRY, Resolved, Retry
from ._requests import (
    OTHER_FINAL,
    Requests,
    client_left,
    status_failure,
    storing_send,
    verdict,
)
from ._settings import Settings
from ._store import Store
from ._telemetry import Telemetry

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
        max_pending: tasks queued (or waiting to retry) at most.
        overflow: what happens when the queue is full. ``"shed"`` (default): a request's
            call waits for room after its response is sent, up to ``overflow_timeout``
            (at most ``max_pending`` tasks wait this way), then its remaining tasks are
            shed: logged, counted, dead-lettered. ``"backpressure"``: *new* requests wait
            before their handler runs until there is room, at most ``admission_timeout``,
            then are answered ``503`` with ``Retry-After``; tasks of requests already
            running wait for room as long as it takes, and none is shed.
        overflow_timeout: with ``overflow="shed"``, seconds a request's call waits for
            room in the queue; ``None`` waits as long as it takes.
        admission_timeout: with ``overflow="backpressure"``, seconds a new request waits
            for room before it is answered ``503``.
        exempt_paths: with ``overflow="backpressure"``, paths never held (health checks,
            readiness probes: requests that add no side effects).
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
        store: a durable store (``SQLiteStore("after_response.sqlite3")``) for side effects
            that must not be lost: ``durable=True`` ones are stored before their response
            completes, replayed after a crash, dead-lettered in the store. See
            :class:`SQLiteStore`.
        engine: a distributed task engine (``CeleryEngine(celery_app)`` from
            ``after_response.celery``, ``TaskiqEngine(broker)`` from ``after_response.taskiq``)
            to hand durable side effects to: they are written to the store's outbox before
            the response completes and published after it, to run in the engine's workers;
            the others still run here. Needs ``store``.
        loop_block_threshold: seconds a side effect may hold the event loop before a
            WARNING names it (with a span event and a metric); ``None`` turns the watchdog
            off. It costs no work per task: one heartbeat timer and one thread.
        log_interval: seconds over which repeated lines about tasks of one name that were
            shed, discarded, abandoned or released are aggregated: the first in full, the
            rest counted into one summary line per name and reason.
        tracer_provider: OpenTelemetry tracer provider (default: the global one).
        meter_provider: OpenTelemetry meter provider (default: the global one).
        state_key: the name of the collector on ``request.state``.

    Raises:
        TypeError: when ``app`` is not callable, or an option is of the wrong type: among
            them a provider without ``get_tracer()`` / ``get_meter()``, a ``store`` that is
            not a store (a path instead of ``SQLiteStore(path)``), an ``on_dead_letter``
            that cannot be called with one argument.
        ValueError: when an option of the right type is out of range.
    """

    def __init__(
        self,
        app: AnyASGIApp,
        *,
        max_concurrency: int = 100,
        max_pending: int = 10_000,
        overflow: str = "shed",
        overflow_timeout: float | None = 5.0,
        admission_timeout: float = 10.0,
        exempt_paths: Collection[str] = (),
        task_timeout: float | None = 60.0,
        retry: Retry | None = None,
        shutdown_timeout: float | None = 20.0,
        run_on_error: bool = False,
        max_threads: int = 40,
        on_dead_letter: DeadLetterHook | None = None,
        store: Store | None = None,
        engine: Engine | None = None,
        loop_block_threshold: float | None = 0.1,
        log_interval: float = 5.0,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        state_key: str = "after_response",
    ) -> None:
        if not callable(app):
            raise TypeError(
                f"AfterResponseMiddleware(app) wraps an ASGI application, got "
                f"{type(app).__name__}; for example AfterResponseMiddleware(Starlette(...))"
            )
        settings = Settings(
            max_concurrency=max_concurrency,
            max_pending=max_pending,
            overflow=overflow,
            overflow_timeout=overflow_timeout,
            admission_timeout=admission_timeout,
            exempt_paths=exempt_paths,
            task_timeout=task_timeout,
            retry=retry,
            shutdown_timeout=shutdown_timeout,
            run_on_error=run_on_error,
            max_threads=max_threads,
            on_dead_letter=on_dead_letter,
            state_key=state_key,
            loop_block_threshold=loop_block_threshold,
            log_interval=log_interval,
            store=store,
            engine=engine,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
        self.app = app
        self.settings = settings
        self.shutdown_timeout = shutdown_timeout
        self.state_key = state_key
        self._executor = Executor(
            settings,
            Telemetry(tracer_provider, meter_provider, log_interval=settings.log_interval),
            defaults=Resolved("", task_timeout, retry or NO_RETRY, run_on_error),
        )
        #: Backpressure: new requests wait for room before their handler runs.
        self._gate = overflow == "backpressure"
        self._requests = Requests(self._executor, settings)
        self._store = store

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Parameters typed Any for the reason given at AnyASGIApp: the middleware must be
        # assignable wherever any framework expects its own ASGI callable type.
        scope_type = scope["type"]
        if scope_type != "http" and scope_type != "websocket":
            if scope_type == "lifespan":
                await serve_lifespan(
                    self.app, self._executor, self.shutdown_timeout, scope, receive, send
                )
            else:
                await self.app(scope, receive, send)
            return

        # The per-request hot path: a request that adds nothing costs a collector, a state
        # dict, a context variable and a send wrapper, and nothing else.
        executor = self._executor
        if self._gate and scope_type == "http" and not await self._requests.admit(scope, send):
            return
        collector = Collector(executor, scope.get("method", "WEBSOCKET"), scope.get("path", ""))
        # A new state dict: a server that shares one between requests must not see ours.
        state = scope.get("state")
        scope["state"] = (
            {**state, self.state_key: collector} if state else {self.state_key: collector}
        )
        token = current_collector.set(collector)
        if scope_type == "websocket":
            await self._requests.websocket(self.app, scope, receive, send, collector, token)
            return

        status = 0
        trailers = complete = client_gone = False

        async def send_watching(message: Message) -> None:
            nonlocal status, trailers, complete, client_gone
            kind = message["type"]
            try:
                await send(message)
            except OSError:
                client_gone = True
                raise
            if kind == "http.response.body":
                if trailers or message.get("more_body", False):
                    return
            elif kind == "http.response.start":
                status = message["status"]
                trailers = message.get("trailers", False)
                return
            elif kind not in OTHER_FINAL or message.get(OTHER_FINAL[kind], False):
                return
            # The server has the whole response: the request's tasks may start now.
            complete = True
            if collector.held and executor.background is not None and not _mode.inline:
                failed = None if status < 500 else status_failure(status)
                collector.hand_over(executor, failed=failed)

        try:
            await self.app(
                scope,
                receive,
                send_watching
                if self._store is None
                else storing_send(executor, collector, send_watching),
            )
        except Exception as exc:
            current_collector.reset(token)
            if complete or client_gone or client_left(exc):
                failed = status_failure(status)
            else:
                failed = f"the app raised {type(exc).__qualname__}"
            await self._requests.finish(collector, failed)
            raise
        except BaseException:
            current_collector.reset(token)
            self._requests.finish_cancelled(collector, status_failure(status))
            raise
        current_collector.reset(token)
        if collector.held or collector.overflow:
            await self._requests.finish(collector, verdict(status, client_gone))
        elif 0 < status < 500:
            collector.close()
        else:
            collector.close(verdict(status, client_gone))  # late adds follow the verdict

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every task added before this call has ended (succeeded, failed,
        timed out, discarded, shed or abandoned). Returns ``False`` if ``timeout`` seconds
        passed first. Tasks added after the call are not waited for, so it returns under
        steady load too (shutdown, by contrast, waits for everything).

        It may be awaited on another event loop than the server's (a test beside a server
        running in a thread of its own). Do not await it inside a request handler for that
        request's own tasks: they only start once the response is complete.
        """
        check_seconds("timeout", timeout)
        return await self._executor.drain(timeout)

    def stats(self) -> Stats:
        """Live counts: added, collected, pending, running, and each terminal outcome."""
        return self._executor.stats()
