"""The outbox relay: durable tasks handed to a distributed engine (Celery, taskiq).

With ``engine=``, a durable task is written to the store's outbox before its response
completes (as any durable task is stored), and is not run here: after the response, the
relay publishes it through the engine, then marks it published in the store and ends it
``handed_off``. The store makes the hand-off lossless:

- the broker is down: the tasks wait, in memory and in the outbox; publishing is retried
  with a growing backoff, each failure logged (aggregated) and counted; requests go on.
  Memory is bounded: past ``max_pending`` waiting here, a task is released (logged and
  counted) and waits in the outbox only, to be claimed once the relay has room again;
- the process dies between response and publish: its outbox rows outlive it, and the relay
  of the next process on the same store (or a live one) claims and publishes them;
- shutdown before they could be published: they are released, still in the outbox.

A crash between publishing and marking published publishes again: delivery is
at-least-once, with the same task id on every delivery.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

import anyio
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ._durable import to_stored
from ._engine import RUNNER_TASK, Engine, Message, encode
from ._logs import log_task, logger, qualified_type
from ._store import OUTBOX
from ._task import Outcome, Task
from ._tracing import span_attributes

if TYPE_CHECKING:
    from ._dispatching import Dispatching

#: Tasks published in one call to the engine.
PUBLISH_BATCH: Final = 256
#: Seconds between two looks for outbox tasks that nobody live owns.
CLAIM_INTERVAL: Final = 1.0
#: Backoff between failed publishes (or engine start-ups): first, growth, cap (seconds).
FIRST_BACKOFF: Final = 0.1
MAX_BACKOFF: Final = 10.0


class Relay:
    """Publishes one middleware's durable tasks through ``engine``."""

    def __init__(self, engine: Engine, executor: Dispatching) -> None:
        self.engine = engine
        self._executor = executor
        self._queue: deque[Task] = deque()
        self._wake = anyio.Event()
        #: Taken out of the queue for the publish under way.
        self._in_flight: list[Task] = []
        self.started = False
        #: Between lifespan startup and shutdown: tasks taken now are published.
        self.running = False
        #: Failures in a row (for the backoff); the total is the ledger's publish_failures.
        self._streak = 0

    # -- taking tasks -------------------------------------------------------------------------

    def take(self, tasks: Iterable[Task]) -> list[Task]:
        """Keep the durable tasks, to publish; return the others (to run in-process)."""
        rest: list[Task] = []
        executor = self._executor
        ledger = executor.ledger
        now = time.perf_counter()
        took = False
        no_room: list[Task] = []
        for task in tasks:
            if not task.record.durable:
                rest.append(task)
                continue
            if not self.running or executor.closing:
                executor.release(
                    [task],
                    "the engine's relay runs between lifespan startup and shutdown, and it is "
                    "not running; the task waits in the outbox for a relay to publish it",
                    taken=False,
                )
                continue
            if self.held >= executor.max_pending:
                no_room.append(task)
                continue
            took = True
            task.ready_at = now
            ledger.left_request += 1
            ledger.outbox += 1
            executor.telemetry.pending(task, 1)
            self._queue.append(task)
        if took:
            self._wake.set()
        if no_room:
            executor.release(
                no_room,
                f"the engine's relay already holds max_pending={executor.max_pending} tasks "
                f"that wait to be published to {self.engine.system} (is the broker down?); the "
                "task waits in the outbox, and the relay claims it once it has room",
                taken=False,
            )
        return rest

    @property
    def held(self) -> int:
        """Tasks in memory here: waiting to be published, or being published."""
        return len(self._queue) + len(self._in_flight)

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Start the engine, then publish what comes, and claim orphaned outbox tasks.

        ``running`` is set by the caller before it spawns this, so that tasks handed over
        before the loop's first turn wait for it."""
        try:
            await self._start_engine()
            next_claim = 0.0
            while True:
                # Orphans are claimed on schedule even under steady load, and only while
                # fewer than a batch wait here (a broker outage does not pull the whole
                # outbox into memory).
                if time.monotonic() >= next_claim:
                    room = self._executor.max_pending - self.held
                    claimed = 0
                    if len(self._queue) < PUBLISH_BATCH and room > 0:
                        claimed = await self._claim(min(PUBLISH_BATCH, room))
                    # A full batch: more may wait (a backlog after an outage): again at once.
                    interval = 0.0 if claimed == PUBLISH_BATCH else CLAIM_INTERVAL
                    next_claim = time.monotonic() + interval
                if self._queue:
                    count = min(PUBLISH_BATCH, len(self._queue))
                    if not await self._publish([self._queue.popleft() for _ in range(count)]):
                        await self._back_off()
                    continue
                self._wake = anyio.Event()
                with anyio.move_on_after(max(0.0, next_claim - time.monotonic())):
                    await self._wake.wait()
        finally:
            self.running = False

    async def _start_engine(self) -> None:
        while not self.started:
            try:
                await self.engine.start()
            except Exception as exc:
                self._failed(f"starting {self.engine.system}", len(self._queue), exc)
                await self._back_off()
            else:
                self.started = True

    async def _publish(self, batch: list[Task]) -> bool:
        """Publish ``batch``; ``True`` once it is marked published and ended ``handed_off``."""
        executor = self._executor
        journal = executor.journal
        assert journal is not None
        tracer = executor.telemetry.tracer
        spans: list[trace.Span] = []
        messages: list[Message] = []
        for task in batch:
            span = None if tracer is None else self._start_span(tracer, task)
            if span is not None:
                spans.append(span)
                carrier: dict[str, str] = {}
                propagate.inject(carrier, context=trace.set_span_in_context(span))
            else:
                carrier = dict(task.record.trace_context or {})
            row = to_stored(
                task.record,
                journal.owner,
                OUTBOX,
                attempt=task.attempt - 1,
                recovered=task.recovered,
            )
            messages.append(
                Message(task.record.id, task.record.name, encode(row, carrier), carrier)
            )
        self._in_flight = batch
        try:
            await self.engine.publish(messages)
        except Exception as exc:
            for span in spans:
                span.set_attribute("error.type", qualified_type(exc))
                span.set_status(Status(StatusCode.ERROR, qualified_type(exc)))
                span.end()
            self._in_flight = []
            self._queue.extendleft(reversed([task for task in batch if not task.done]))
            self._failed(f"publishing to {self.engine.system}", len(batch), exc)
            return False
        except BaseException:
            for span in spans:
                span.end()
            self._in_flight = []
            self._queue.extendleft(reversed([task for task in batch if not task.done]))
            raise
        self._in_flight = []
        self._streak = 0
        for span in spans:
            span.set_attribute("after_response.task.outcome", Outcome.HANDED_OFF.value)
            span.end()
        journal.published(batch)
        ledger = executor.ledger
        for task in batch:
            if task.done:  # released at the shutdown deadline while its publish went on
                continue
            ledger.outbox -= 1
            executor.telemetry.pending(task, -1)
            log_task(logging.DEBUG, task, "handed off to %s", self.engine.system)
            executor.end(task, Outcome.HANDED_OFF, attempts=0)
        return True

    def _start_span(self, tracer: trace.Tracer, task: Task) -> trace.Span:
        """The PRODUCER span of one publish, a child of the span current at ``add()``."""
        return task.context.run(
            tracer.start_span,
            f"after_response publish {task.record.name}",
            kind=SpanKind.PRODUCER,
            attributes={
                **span_attributes(task),
                "messaging.system": self.engine.system,
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.destination.name": RUNNER_TASK,
                "messaging.message.id": task.record.id,
            },
        )

    def _failed(self, what: str, count: int, exc: Exception) -> None:
        """A failed start or publish: logged (aggregated while it goes on), counted."""
        self._streak += 1
        executor = self._executor
        executor.ledger.publish_failures += 1
        kind = qualified_type(exc)
        # The type only: an engine's error text may quote the message, and so its data.
        executor.telemetry.aggregator.emit(
            logging.WARNING,
            (what, kind),
            "after-response: %s failed (%s); %d durable task(s) wait in the outbox, "
            "retrying in %.1fs (the app goes on serving)",
            (what, kind, count, self._delay()),
            {"error_type": kind, "engine": self.engine.system},
            counted="failures of",
        )

    def _delay(self) -> float:
        return min(MAX_BACKOFF, FIRST_BACKOFF * 2.0 ** max(0, self._streak - 1))

    async def _back_off(self) -> None:
        await anyio.sleep(self._delay() * random.uniform(0.8, 1.2))

    async def _claim(self, limit: int) -> int:
        """Take up to ``limit`` outbox tasks nobody live owns (a dead process's, or released);
        how many were taken."""
        tasks = await self._executor.claim_stored(
            limit, states=(OUTBOX,), what="claiming the outbox"
        )
        self.take(tasks)
        return len(tasks)

    # -- shutdown -----------------------------------------------------------------------------

    def release_all(self, reason: str) -> None:
        """Shutdown's deadline passed: what is not published goes back to the outbox."""
        tasks = [*self._in_flight, *self._queue]
        self._in_flight = []
        self._queue.clear()
        ledger = self._executor.ledger
        for task in tasks:
            ledger.outbox -= 1
            self._executor.telemetry.pending(task, -1)
        if tasks:
            self._executor.release(tasks, reason)

    async def stop(self) -> None:
        """Stop the engine (once the loop has ended)."""
        if self.started:
            self.started = False
            try:
                await self.engine.stop()
            except Exception as exc:
                logger.warning(
                    "after-response: stopping %s raised %s", self.engine.system, qualified_type(exc)
                )
