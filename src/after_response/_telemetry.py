"""Telemetry's verbs: what the dispatchers call as a task moves (added, queued, started,
retried, finished, never run), turned into spans, metrics and log lines.

Tracing and metrics follow the OpenTelemetry API only: with no SDK installed (the global
provider is still the proxy or a no-op) every verb below short-circuits on a ``None``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final, Generic, TypeVar

from opentelemetry import metrics, trace

from . import _tracing, _version
from ._aggregate import LogAggregator
from ._logs import log_task, log_task_aggregated, logger
from ._metrics import Instruments, is_noop_meter_provider
from ._task import Outcome, Task
from ._tracing import AttemptSpan

#: The semantic conventions the attributes follow: ``code.function.name`` (a fully-qualified
#: name, replacing ``code.namespace`` + ``code.function``) is stable from 1.33.0.
_SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.33.0"
#: How often an unset global provider is looked up again.
_RECHECK_SECONDS: Final = 1.0

P = TypeVar("P")
T = TypeVar("T")


class _FromProvider(Generic[P, T]):
    """What a provider gives (a tracer, the instruments), from an explicit provider or the
    global one. The global one is looked up again at most once a second (it reads
    ``os.environ``) until a real SDK provider is set, so an SDK configured after the
    middleware was built, at application start-up for instance, is picked up."""

    def __init__(
        self,
        explicit: P | None,
        get_global: Callable[[], P],
        is_noop: Callable[[P], bool],
        is_proxy: Callable[[P], bool],
        make: Callable[[P], T],
    ) -> None:
        self._explicit = explicit
        self._get_global = get_global
        self._is_noop = is_noop
        self._is_proxy = is_proxy
        self._make = make
        self._provider: object = None
        self._next_check = 0.0
        self.settled = False
        #: As of the last look: read on the per-task path, where looking again would cost.
        self.value: T | None = None

    def get(self) -> T | None:
        if self.settled:
            return self.value
        now = time.monotonic()
        if now < self._next_check:
            return self.value
        self._next_check = now + _RECHECK_SECONDS
        return self.look()

    def look(self) -> T | None:
        """Look at the provider now."""
        provider = self._explicit or self._get_global()
        if provider is not self._provider:
            self._provider = provider
            self.value = None if self._is_noop(provider) else self._make(provider)
        self.settled = self._explicit is not None or not self._is_proxy(provider)
        return self.value


class Telemetry:
    """Spans, metrics and logs for one middleware, from explicit or global providers."""

    #: Whether a tracer or the instruments were found at the last look. The executor checks
    #: it once per step of a task and skips the verbs that would only find ``None``: with no
    #: SDK, a task costs one look (in :meth:`added`) and a bool check per step.
    on = False

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        log_interval: float = 5.0,
    ) -> None:
        #: Lines about tasks that never ran come in floods: aggregated per name and reason.
        self.aggregator = LogAggregator(logger, log_interval)
        self._tracer = _FromProvider(
            tracer_provider,
            trace.get_tracer_provider,
            _tracing.is_noop_tracer_provider,
            lambda provider: isinstance(provider, trace.ProxyTracerProvider),
            lambda provider: provider.get_tracer(
                "after_response", _version.VERSION, schema_url=_SCHEMA_URL
            ),
        )
        self._instruments = _FromProvider(
            meter_provider,
            metrics.get_meter_provider,
            is_noop_meter_provider,
            lambda provider: type(provider).__name__ == "_ProxyMeterProvider",
            lambda provider: Instruments(
                provider.get_meter("after_response", _version.VERSION, schema_url=_SCHEMA_URL)
            ),
        )
        self._settled = False
        self._next_look = 0.0

    @property
    def tracer(self) -> trace.Tracer | None:
        """The tracer to use now, or ``None`` when tracing is off."""
        return self._tracer.get()

    # -- the verbs ---------------------------------------------------------------------------

    def _look(self) -> None:
        """Look at the providers again (at most once a second until both are settled)."""
        self._next_look = time.monotonic() + _RECHECK_SECONDS
        tracer, instruments = self._tracer.look(), self._instruments.look()
        self.on = tracer is not None or instruments is not None
        self._settled = self._tracer.settled and self._instruments.settled

    def look(self) -> None:
        """Look at the providers if it is time (once a second until both are settled): for
        a caller whose tasks were not added through :meth:`added` (an engine's worker)."""
        if not self._settled and time.monotonic() >= self._next_look:
            self._look()

    def added(self, task: Task) -> None:
        """A request added ``task`` (the one place the providers are looked at, per task)."""
        if not self._settled and time.monotonic() >= self._next_look:
            self._look()
        instruments = self._instruments.value
        if instruments is not None:
            task.tally = tally = instruments.tally(task.record.name)
            tally.added += 1

    def track(self, task: Task) -> None:
        """Measure ``task``, which did not come through :meth:`added` (an engine worker's)."""
        instruments = self._instruments.value
        if instruments is not None:
            task.tally = instruments.tally(task.record.name)

    def pending(self, task: Task, delta: int) -> None:
        """``task`` joined (+1) or left (-1) the pending tasks."""
        tally = task.tally
        if tally is not None:
            tally.pending += delta

    def attempt_started(self, task: Task, queue_wait: float) -> AttemptSpan | None:
        """An attempt starts: counted as running, its queue time recorded, its span opened
        (in the task's context)."""
        tally = task.tally
        if tally is not None:
            tally.running += 1
            tally.queue_duration.record(queue_wait, tally.name_attributes)
        tracer = self._tracer.value
        return None if tracer is None else _tracing.start_attempt(tracer, task, queue_wait)

    def attempt_ended(
        self,
        task: Task,
        span: AttemptSpan | None,
        outcome: Outcome,
        exc: BaseException | None,
        duration: float,
    ) -> None:
        """An attempt ended with ``outcome`` (``RETRY`` if it runs again)."""
        if span is not None:
            if task.blocked:  # seen by the loop watchdog while this attempt ran
                task.blocked = False
                span.span.add_event("after_response.loop_blocked")
            _tracing.end_attempt(span, task, outcome, exc)
        tally = task.tally
        if tally is not None:
            tally.running -= 1
            tally.duration.record(duration, tally.outcome_attributes[outcome._value_])

    def ended_lines(
        self, tasks: list[Task], outcome: Outcome, level: int, what: str, *args: object
    ) -> None:
        """The lines of tasks that ended abandoned, shed, discarded or released, through the
        aggregator: the first per task name and outcome in an interval in full, the rest
        counted into one summary line. One question to the aggregator per task name, and a
        line built only when it is written: a flood sheds thousands of tasks at once."""
        named: dict[str, list[Task]] = {}
        for task in tasks:
            named.setdefault(task.record.name, []).append(task)
        for of_name in named.values():
            log_task_aggregated(
                self.aggregator, outcome._value_, level, of_name[0], what, *args, count=len(of_name)
            )

    def loop_blocked(self, task: Task | None, blocked_for: float, threshold: float) -> None:
        """A side effect (``task``) held the event loop for ``blocked_for`` seconds."""
        if task is None:
            return  # not a side effect: the app's own code, not ours to name
        log_task(
            logging.WARNING,
            task,
            "held the event loop for %.3fs (more than loop_block_threshold=%ss): an async "
            "side effect must not block; run blocking code in a plain def function (it runs "
            "in a worker thread) or await an async client",
            blocked_for,
            threshold,
        )
        tally = task.tally
        if tally is not None:
            tally.loop_blocked += 1

    def stored(self, task: Task) -> None:
        """Durable ``task`` was committed to the store."""
        tally = task.tally
        if tally is not None:
            tally.stored += 1

    def recovered(self, task: Task) -> None:
        """Durable ``task`` was taken over from a process that died."""
        tally = task.tally
        if tally is not None:
            tally.recovered += 1

    def retried(self, task: Task) -> None:
        """``task`` failed an attempt and will run again."""
        tally = task.tally
        if tally is not None:
            tally.retries += 1

    def finished(self, task: Task, outcome: Outcome) -> None:
        """``task`` reached its terminal state."""
        tally = task.tally
        if tally is not None:
            tally.finished[outcome._value_] += 1

    def unrun(
        self, tasks: list[Task], outcome: Outcome, level: int, what: str, *args: object
    ) -> None:
        """``tasks`` ended without running (discarded, shed, abandoned, released): a span
        each, and their lines, aggregated with the others of their name and outcome (no log
        storms)."""
        self.ended_lines(tasks, outcome, level, what, *args)
        for task in tasks:
            self.unrun_span(task, outcome)

    def unrun_span(self, task: Task, outcome: Outcome) -> None:
        """The zero-length span of ``task``, which ended with ``outcome`` without running
        (its line written by the caller)."""
        tracer = self._tracer.get()
        if tracer is not None:
            _tracing.record_unrun(tracer, task, outcome)
