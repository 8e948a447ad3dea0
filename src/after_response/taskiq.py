"""Hand durable side effects to taskiq: ``TaskiqEngine(broker)``.

``AfterResponseMiddleware(app, store=..., engine=TaskiqEngine(broker))`` publishes each durable
side effect, after its response, as one message of the generic runner task
(:data:`~after_response._engine.RUNNER_TASK`), which a taskiq worker runs with the in-process
semantics (timeout, ``Retry`` policy, dead letters, ``current_task()``, spans and log lines).

Where to construct it: in the module that defines the broker, the one the worker is started
with (``taskiq worker proj.tasks:broker``), right after the broker::

    broker = RedisStreamBroker("redis://...", unacknowledged_lock_timeout=30)
    engine = TaskiqEngine(broker)

Constructing the engine registers the runner task on the broker; a worker whose broker module
does not construct it logs ``task "after_response.run" is not found`` and drops the messages.
The web process imports the same module and passes ``engine`` to the middleware.

The broker must acknowledge a message after its task has run and give a dead worker's
messages to another worker: ``taskiq_redis.RedisStreamBroker``. Brokers without
acknowledgements (``ListQueueBroker``, ``PubSubBroker``) are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, Final

import anyio
from opentelemetry import trace
from redis.asyncio import Redis
from taskiq import AsyncBroker, Context, InMemoryBroker, TaskiqDepends, TaskiqEvents, TaskiqState
from taskiq_redis import (
    ListQueueBroker,
    ListQueueClusterBroker,
    ListQueueSentinelBroker,
    PubSubBroker,
    PubSubSentinelBroker,
    RedisStreamBroker,
    RedisStreamClusterBroker,
    RedisStreamSentinelBroker,
)

from ._checks import check_seconds
from ._dead_letters import DeadLetterHook
from ._engine import RUNNER_TASK, Message
from ._logs import logger
from ._taskiq_send import (
    WAKE_UP,
    pipelines,
    send_each,
    send_pipelined,
    wake_claimers,
)
from ._worker import WorkerRunner

__all__ = ["TaskiqEngine"]

#: Brokers that never acknowledge: a task whose worker dies is lost.
_WITHOUT_ACKS: Final = (
    ListQueueBroker,
    ListQueueClusterBroker,
    ListQueueSentinelBroker,
    PubSubBroker,
    PubSubSentinelBroker,
)
#: Brokers that acknowledge but never claim a dead worker's messages back (taskiq-redis 1.2).
_WITHOUT_RECLAIM: Final = (RedisStreamClusterBroker, RedisStreamSentinelBroker)
#: The message labels that carry the trace context when no instrumentation consumes them.
_TRACE_LABELS: Final = ("traceparent", "tracestate")


class TaskiqEngine:
    """The taskiq engine for ``AfterResponseMiddleware(engine=...)``.

    Args:
        broker: the taskiq broker the workers listen to: a ``taskiq_redis.RedisStreamBroker``
            (or another broker that acknowledges after execution and redelivers).
        on_dead_letter: called in the worker, in a thread of its own, with a ``DeadLetter``
            for every side effect whose last attempt failed or timed out there. A worker
            that stops gives it 5 s for the dead letters it still has.
        log_interval: seconds over which the worker aggregates its lines about side effects
            that failed, timed out or will be retried (per task name and what happened: the
            first in full, with its traceback, the rest counted in one summary line), as
            ``AfterResponseMiddleware(log_interval=...)`` does.
        publish_timeout: seconds that :meth:`start`, and each :meth:`publish` call, may take
            before they raise ``TimeoutError`` (a broker that does not answer).

    Raises:
        TypeError: ``broker`` is not a taskiq broker, or one without acknowledgements, or a
            ``publish_timeout`` or ``log_interval`` is not a number.
        ValueError: a ``publish_timeout`` or ``log_interval`` that is not positive and finite,
            or the broker already has a runner task (one engine per broker).

    Attributes:
        broker: the broker.
        runner: the worker-side runner; ``engine.runner.stats()`` counts the runs of this
            worker process.
    """

    system: str = "taskiq"

    def __init__(
        self,
        broker: AsyncBroker,
        *,
        on_dead_letter: DeadLetterHook | None = None,
        publish_timeout: float = 10.0,
        log_interval: float = 5.0,
    ) -> None:
        if not isinstance(broker, AsyncBroker):
            raise TypeError(
                f"TaskiqEngine() expects a taskiq broker, got {type(broker).__name__}: pass "
                "the broker your workers run, e.g. TaskiqEngine(RedisStreamBroker(url))"
            )
        if isinstance(broker, _WITHOUT_ACKS):
            raise TypeError(
                f"TaskiqEngine() cannot use a {type(broker).__name__}: it does not acknowledge "
                "messages, so a side effect whose worker dies is lost; use "
                "taskiq_redis.RedisStreamBroker (acknowledged after execution, claimed back "
                "from a dead worker)"
            )
        publish_timeout = check_seconds("publish_timeout", publish_timeout, or_none=False)
        if broker.find_task(RUNNER_TASK) is not None:
            raise ValueError(
                f"this {type(broker).__name__} already has the {RUNNER_TASK!r} task: construct "
                "one TaskiqEngine per broker, once, next to the broker, and share it"
            )
        self.broker = broker
        self.runner = WorkerRunner(
            self.system, on_dead_letter=on_dead_letter, log_interval=log_interval
        )
        self._publish_timeout = float(publish_timeout)
        self._broker_running = False  # the client side of the broker (not a worker's)
        self._started_broker = False  # start() started it, so stop() shuts it down
        self._waker: asyncio.Task[None] | None = None
        # The client of the one-round-trip batches (see _taskiq_send), on the broker's pool.
        self._client: Redis | None = None
        if pipelines(broker):
            self._client = Redis(connection_pool=broker.connection_pool)
        broker.register_task(_runner_task(self.runner), task_name=RUNNER_TASK)
        broker.add_event_handler(TaskiqEvents.CLIENT_STARTUP, self._on_client_startup)
        broker.add_event_handler(TaskiqEvents.CLIENT_SHUTDOWN, self._on_client_shutdown)
        if isinstance(broker, RedisStreamBroker):
            broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, self._on_worker_startup)
        broker.add_event_handler(TaskiqEvents.WORKER_SHUTDOWN, self._on_worker_shutdown)

    def _on_client_startup(self, state: TaskiqState) -> None:
        self._broker_running = True

    def _on_client_shutdown(self, state: TaskiqState) -> None:
        self._broker_running = False

    def _on_worker_startup(self, state: TaskiqState) -> None:
        assert isinstance(self.broker, RedisStreamBroker)
        self._waker = asyncio.ensure_future(wake_claimers(self.broker))

    async def _on_worker_shutdown(self, state: TaskiqState) -> None:
        waker, self._waker = self._waker, None
        if waker is not None:
            waker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waker
        # Off the loop: it waits for the dead-letter hook's thread.
        await asyncio.to_thread(self.runner.shutdown)

    def check(self) -> None:
        """Check the broker's settings (at lifespan startup, before the app serves): those
        that weaken the redelivery of a dead worker's tasks are logged as warnings on the
        ``after_response`` logger, once (see the taskiq engine's page)."""
        self._warn_about_settings()

    async def start(self) -> None:
        """Start the broker's client side unless the app already did (``await
        broker.startup()``: it declares the stream's consumer group), and check that the
        broker answers. Retried by the relay while it fails.

        Raises:
            TimeoutError: the broker did not answer within ``publish_timeout`` seconds.
            Exception: the broker's own error (refused connection...).
        """
        try:
            with anyio.fail_after(self._publish_timeout):
                if not self._broker_running:
                    self._started_broker = True
                    await self.broker.startup()
                await self._ping()
        except TimeoutError:
            self._forget_failed_startup()
            raise TimeoutError(
                f"the taskiq broker ({type(self.broker).__name__}) did not answer within "
                f"publish_timeout={self._publish_timeout} s; is it running and reachable?"
            ) from None
        except BaseException:
            self._forget_failed_startup()
            raise

    def _forget_failed_startup(self) -> None:
        # So that the relay's next start() runs the broker's startup again.
        if self._started_broker:
            self._started_broker = self._broker_running = False

    async def _ping(self) -> None:
        if isinstance(self.broker, RedisStreamBroker):
            async with Redis(connection_pool=self.broker.connection_pool) as connection:
                await connection.ping()

    def _warn_about_settings(self) -> None:
        broker, kind = self.broker, type(self.broker).__name__
        if isinstance(broker, RedisStreamBroker):
            if broker.unacknowledged_lock_timeout is None:
                logger.warning(
                    "taskiq engine: %s(unacknowledged_lock_timeout=None): a worker killed while "
                    "it claims abandoned messages keeps the claim lock forever, and no worker "
                    "claims a dead worker's tasks again; set unacknowledged_lock_timeout "
                    "(seconds, e.g. 30)",
                    kind,
                )
            if broker.maxlen is not None:
                logger.warning(
                    "taskiq engine: %s(maxlen=%d) trims the stream, unacknowledged and unread "
                    "messages too: a backlog longer than maxlen loses side effects; leave "
                    "maxlen=None",
                    kind,
                    broker.maxlen,
                )
        elif isinstance(broker, _WITHOUT_RECLAIM):
            logger.warning(
                "taskiq engine: a %s acknowledges after execution but never claims a dead "
                "worker's messages back: a side effect whose worker is killed stays pending "
                "until it is claimed by hand; use RedisStreamBroker for redelivery",
                kind,
            )
        elif isinstance(broker, InMemoryBroker):
            logger.warning(
                "taskiq engine: an InMemoryBroker runs the side effects in this process, "
                "without durability: for tests only"
            )
        else:
            logger.warning(
                "taskiq engine: after-response cannot check that a %s redelivers a message "
                "whose worker died before it acknowledged; make sure it does",
                kind,
            )

    async def publish(self, messages: Sequence[Message]) -> None:
        """Send each message as one run of the runner task, in order.

        The task id is the message id; the body is the task's one argument; the trace
        headers are message labels, and the send runs under the trace context they
        describe (taskiq's ``OpenTelemetryMiddleware``, when installed, opens its PRODUCER
        span there). Each message is acknowledged by the worker after it ran. To a
        ``RedisStreamBroker`` the messages go in one Redis round trip (a pipeline of the
        ``XADD``s its ``kick`` runs); to other brokers, one ``kiq`` each. On an error, those
        sent before it may be sent again by the next call (at least once).

        Raises:
            RuntimeError: neither :meth:`start` nor the app started the broker (without
                its startup, the stream's consumer group may not exist yet, and the workers
                would never see messages sent before it does).
            TimeoutError: the messages were not all sent within ``publish_timeout`` seconds.
            taskiq.exceptions.SendTaskError: the broker refused one (its cause attached).
        """
        if not (self._started_broker or self._broker_running):
            raise RuntimeError(
                "TaskiqEngine.publish() before start(): await engine.start() first (the "
                "middleware does, at lifespan startup), or await broker.startup()"
            )
        try:
            with anyio.fail_after(self._publish_timeout):
                if self._client is not None:
                    assert isinstance(self.broker, RedisStreamBroker)
                    await send_pipelined(self.broker, self._client, messages)
                else:
                    await send_each(self.broker, messages)
        except TimeoutError:
            raise TimeoutError(
                f"the taskiq broker ({type(self.broker).__name__}) did not take "
                f"{len(messages)} message(s) within publish_timeout={self._publish_timeout} s"
            ) from None

    async def stop(self) -> None:
        """Shut down the broker's client side if :meth:`start` started it; idempotent."""
        if self._started_broker:
            self._started_broker = False
            await self.broker.shutdown()


def _runner_task(runner: WorkerRunner) -> Callable[..., Awaitable[str]]:
    """The runner task's function: one message body in, the outcome's name out."""

    async def run_after_response_task(
        body: Any, context: Annotated[Context, TaskiqDepends()]
    ) -> str:
        if body == WAKE_UP:
            return "woken"
        parent = None
        if not trace.get_current_span().get_span_context().is_valid:
            # No instrumentation continued the trace here: the labels carry the context of
            # the send (taskiq's PRODUCER span, or ours).
            labels = context.message.labels
            parent = {name: str(labels[name]) for name in _TRACE_LABELS if labels.get(name)}
        # taskiq-redis hands a claimed-back message over as a first delivery: a redelivery
        # cannot be told apart here.
        outcome = await runner.run(body, parent=parent or None, redelivered=False)
        return outcome.value

    return run_after_response_task
