"""Publish runner-task messages to a Celery broker (``CeleryEngine.start`` and ``publish``).

Imported by ``after_response.celery`` only: the core package never imports Celery or kombu.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Final, TypeVar

from celery import Celery
from kombu import Connection, Producer, Queue
from opentelemetry import context as otel_context
from opentelemetry import propagate

from ._engine import RUNNER_TASK, Message

T = TypeVar("T")

#: What Celery shows (message headers, events, Flower) for the runner task's arguments.
_ARGS_NOT_SHOWN: Final = "('<an after-response message: arguments not shown>',)"

#: Redis commands one message may take in a publish batch (``LPUSH``, and ``PEXPIRE``s for
#: queues with ``x-expires``): past that, kombu sends the pipeline before the batch ends.
_COMMANDS: Final = 8


class Publisher:
    """One thread and one broker connection, used only in that thread (kombu's connections
    and producers are not safe to share across threads)."""

    def __init__(self, app: Celery, queue: str | None, timeout: float) -> None:
        self.app, self.queue, self.timeout = app, queue, timeout
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="after-response-celery")
        self.connection: Connection | None = None
        self.producer: Producer | None = None
        self.bound_queue: Queue | None = None

    async def start(self) -> None:
        await self._in_thread(self._connect, time.monotonic() + self.timeout)

    async def publish(self, messages: list[Message]) -> None:
        if messages:
            deadline = time.monotonic() + self.timeout
            await self._in_thread(lambda: self._send(messages, deadline), deadline)

    def close(self) -> None:
        self.executor.submit(self._close)
        # A publish stuck on a hung broker must not hold up shutdown.
        self.executor.shutdown(wait=False)

    async def _in_thread(self, call: Callable[[], T], deadline: float) -> T:
        future: Future[T] = self.executor.submit(call)
        try:
            return await asyncio.wait_for(
                asyncio.wrap_future(future), max(0.0, deadline - time.monotonic())
            )
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"the Celery broker did not answer within {self.timeout} s "
                "(CeleryEngine publish_timeout)"
            ) from None

    def _connect(self) -> None:
        if self.producer is not None:
            return
        connection = self.app.connection_for_write(
            connect_timeout=self.timeout,
            transport_options={
                # Redis: without a socket timeout, a broker that stops answering hangs us.
                "socket_timeout": self.timeout,
                "socket_connect_timeout": self.timeout,
                **(self.app.conf.broker_transport_options or {}),
            },
        )
        try:
            connection.connect()
            channel = connection.default_channel
            producer = self.app.amqp.Producer(channel)
            self.bound_queue = self._bound_queue(channel)
        except BaseException:
            connection.release()
            raise
        self.connection, self.producer = connection, producer

    def _bound_queue(self, channel: Any) -> Queue | None:
        """The queue Celery routes every message to, bound to ``channel`` (kombu copies an
        unbound queue for every message it publishes: a quarter of a batch's cost); None
        when ``task_routes`` may route each message its own way."""
        if self.queue is None and self.app.amqp.routes:
            return None
        queue = self.app.amqp.queues[self.queue or self.app.conf.task_default_queue]
        bound: Queue = queue.bind(channel)
        return bound

    def _send(self, messages: list[Message], deadline: float) -> None:
        self._connect()
        try:
            self._send_each(messages, deadline)
        except BaseException:
            self._close()  # the next call starts from a fresh connection
            raise

    def _send_each(self, messages: list[Message], deadline: float) -> None:
        with self._batch(len(messages)):
            for message in messages:
                if time.monotonic() > deadline:
                    return  # the caller has already raised TimeoutError (the batch is sent)
                self._send_one(message)

    def _batch(self, size: int) -> AbstractContextManager[object]:
        """kombu's publish batch (5.7+): each ``send_task`` buffers its ``LPUSH`` in one
        Redis pipeline, sent when the batch ends (discarded on an error). Celery's publish
        signals still fire per message, under its context. kombu publishes each message
        at once on a transport without batches, or with a client that retries on timeout
        (a replayed pipeline could double messages)."""
        batch = getattr(self.producer, "batch", None)
        if batch is None:
            return nullcontext()
        context: AbstractContextManager[object] = batch(max_size=max(size, 1) * _COMMANDS)
        return context

    def _send_one(self, message: Message) -> None:
        # Publish under the message's trace context, so Celery's own instrumentation
        # (if any) opens its publish span as a child of ours.
        token = otel_context.attach(propagate.extract(message.headers))
        queue = self.queue if self.bound_queue is None else self.bound_queue
        try:
            self.app.send_task(
                RUNNER_TASK,
                args=[message.body],
                task_id=message.id,
                headers=dict(message.headers),
                queue=queue,  # type: ignore[arg-type]  # a name or a kombu Queue
                producer=self.producer,
                ignore_result=True,
                add_to_parent=False,
                # Celery copies repr(args) into the message headers, its events and
                # Flower: ours would show user data there.
                argsrepr=_ARGS_NOT_SHOWN,
                kwargsrepr="{}",
            )
        finally:
            otel_context.detach(token)

    def _close(self) -> None:
        connection, self.connection, self.producer = self.connection, None, None
        self.bound_queue = None
        if connection is not None:
            connection.release()
