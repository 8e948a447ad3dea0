"""Send runner-task messages to a taskiq broker (``TaskiqEngine.publish``), and the
worker's wake-up messages (:func:`wake_claimers`).

To a ``RedisStreamBroker`` a batch goes in one Redis round trip: each message becomes the
bytes ``AsyncKicker.kiq`` would send (same ``TaskiqMessage``, same middleware ``pre_send``
hooks, the broker's formatter) and the ``XADD``s its ``kick`` would run are pipelined; then
the ``post_send`` hooks run. Other brokers get one ``AsyncKicker.kiq`` per message.

Each message's ``pre_send`` hooks run under the trace context of its headers (attached on
top of the previous message's, in order), so taskiq's ``OpenTelemetryMiddleware`` parents
its PRODUCER span there; after the send the hooks' ``post_send`` and the detaches run in
the reverse order, so every context is restored last in, first out. All of it runs in a task
of its own, in a copy of the caller's context: a hook that leaves a context attached (taskiq's
``OpenTelemetryMiddleware`` does, for a message that was not sent) cannot change the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from typing import Any, Final, TypeGuard

from opentelemetry import context as otel_context
from opentelemetry import propagate
from redis.asyncio import Redis
from taskiq import AsyncBroker, TaskiqMiddleware
from taskiq.acks import AcknowledgeType
from taskiq.exceptions import SendTaskError
from taskiq.kicker import AsyncKicker
from taskiq.labels import prepare_label
from taskiq.message import TaskiqMessage
from taskiq.utils import maybe_awaitable
from taskiq_redis import RedisStreamBroker

from ._engine import RUNNER_TASK, Message
from ._logs import logger

#: Sent with every message: the worker acknowledges it after the runner returned, whatever
#: its own ``--ack-type``, so a message whose worker dies mid-run is delivered again.
ACK_AFTER_EXECUTION: Final = AcknowledgeType.WHEN_EXECUTED.value
#: The body of a wake-up message (see :func:`wake_claimers`): the runner task ignores it.
WAKE_UP: Final = {"after_response_wake_up": 1}


def pipelines(broker: AsyncBroker) -> TypeGuard[RedisStreamBroker]:
    """Whether :func:`send_pipelined` can stand in for the broker's ``kick``: a
    ``RedisStreamBroker`` whose ``kick`` is taskiq-redis's own."""
    return isinstance(broker, RedisStreamBroker) and type(broker).kick is RedisStreamBroker.kick


async def send_pipelined(
    broker: RedisStreamBroker, client: Redis, messages: Sequence[Message]
) -> None:
    """Send every message in one pipeline of ``XADD``s on ``client``.

    Raises:
        SendTaskError: Redis refused the pipeline (its cause attached).
        Exception: a middleware's ``pre_send`` or ``post_send`` hook raised.
    """
    await asyncio.create_task(_send_pipelined(broker, client, messages))


async def _send_pipelined(
    broker: RedisStreamBroker, client: Redis, messages: Sequence[Message]
) -> None:
    pre_send = [m for m in broker.middlewares if _overrides(m, "pre_send")]
    post_send = [m for m in reversed(broker.middlewares) if _overrides(m, "post_send")]
    sent = False

    async def after_send(message: TaskiqMessage) -> None:
        if sent:  # as AsyncKicker: no post_send for a message that was not sent
            for middleware in post_send:
                await maybe_awaitable(middleware.post_send(message))

    async with contextlib.AsyncExitStack() as unwind, client.pipeline(transaction=False) as pipe:
        for message in messages:
            if pre_send or post_send:
                token = otel_context.attach(propagate.extract(message.headers))
                unwind.callback(otel_context.detach, token)
            taskiq_message = runner_message(message)
            for middleware in pre_send:
                taskiq_message = await maybe_awaitable(middleware.pre_send(taskiq_message))
            if post_send:
                unwind.push_async_callback(after_send, taskiq_message)
            dumped = broker.formatter.dumps(taskiq_message)
            pipe.xadd(
                dumped.labels.get("queue_name") or broker.queue_name,
                {b"data": dumped.message},
                maxlen=broker.maxlen,
                approximate=broker.approximate,
            )
        try:
            await pipe.execute()
        except Exception as exc:
            raise SendTaskError from exc
        sent = True


async def send_each(broker: AsyncBroker, messages: Sequence[Message]) -> None:
    """Send the messages one ``AsyncKicker.kiq`` at a time, each under the trace context
    of its headers.

    Raises:
        SendTaskError: the broker refused one (its cause attached).
    """
    for message in messages:
        labels: dict[str, Any] = {**message.headers, "ack_type": ACK_AFTER_EXECUTION}
        kicker: AsyncKicker[[dict[str, Any]], str] = AsyncKicker(RUNNER_TASK, broker, labels)
        token = otel_context.attach(propagate.extract(message.headers))
        try:
            await kicker.with_task_id(message.id).kiq(message.body)
        finally:
            otel_context.detach(token)


def runner_message(message: Message) -> TaskiqMessage:
    """The ``TaskiqMessage`` ``AsyncKicker(RUNNER_TASK, ...).with_task_id(id).kiq(body)``
    builds, before the middlewares (a test compares the bytes sent)."""
    labels: dict[str, Any] = {}
    labels_types: dict[str, int] = {}
    for name, value in (*message.headers.items(), ("ack_type", ACK_AFTER_EXECUTION)):
        labels[name], labels_types[name] = prepare_label(value)
    return TaskiqMessage(
        task_id=message.id,
        task_name=RUNNER_TASK,
        labels=labels,
        labels_types=labels_types,
        args=[message.body],
        kwargs={},
    )


def _overrides(middleware: TaskiqMiddleware, hook: str) -> bool:
    """As ``AsyncKicker``: a hook the middleware's class does not override is skipped."""
    return getattr(type(middleware), hook) is not getattr(TaskiqMiddleware, hook)


async def wake_claimers(broker: RedisStreamBroker) -> None:
    """Worker side: while a message left unacknowledged by a dead worker has waited past
    ``idle_timeout``, send a no-op message.

    A ``RedisStreamBroker`` worker claims such messages (``XAUTOCLAIM``) only after a read
    that returned new ones: on a quiet stream a killed worker's task would wait for the next
    publish. Every worker process looks every ``idle_timeout / 2`` (0.5 to 30 s).
    """
    interval = min(max(broker.idle_timeout / 2000, 0.5), 30.0)
    wake_up = TaskiqMessage(
        task_id="",
        task_name=RUNNER_TASK,
        labels={"ack_type": ACK_AFTER_EXECUTION},
        args=[WAKE_UP],
        kwargs={},
    )
    failing = False
    async with Redis(connection_pool=broker.connection_pool) as connection:
        while True:
            await asyncio.sleep(interval)
            try:
                abandoned = await connection.xpending_range(
                    broker.queue_name,
                    broker.consumer_group_name,
                    min="-",
                    max="+",
                    count=1,
                    idle=broker.idle_timeout,
                )
                if abandoned:
                    wake_up.task_id = uuid.uuid4().hex
                    await broker.kick(broker.formatter.dumps(wake_up))
                failing = False
            except Exception as exc:  # Redis away: the worker's own reads fail loudly too.
                if not failing:
                    logger.warning(
                        "taskiq engine: cannot look for messages of dead workers (%s: %s); "
                        "trying again every %s s",
                        type(exc).__name__,
                        exc,
                        interval,
                    )
                failing = True
