"""Where spans are opened, metrics recorded and log lines written for each task.

Tracing and metrics follow the OpenTelemetry API only: with no SDK installed (the global
provider is still the proxy or a no-op) every call below short-circuits on a boolean.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, Span, SpanKind, Status
from opentelemetry.trace import StatusCode as _StatusCode

from . import _version
from ._errors import TaskTimeoutError

if TYPE_CHECKING:
    from ._job import Job

logger: Final = logging.getLogger("after_response")

SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
TIMED_OUT: Final = "timed_out"
DISCARDED: Final = "discarded"
SHED: Final = "shed"
ABANDONED: Final = "abandoned"
RETRY: Final = "retry"

#: ``error.type`` for outcomes that have no exception type of their own.
_ERROR_TYPES: Final = {TIMED_OUT: "timeout", SHED: "shed", ABANDONED: "abandoned"}

#: The semantic conventions the attributes follow: ``code.function.name`` (a fully-qualified
#: name, replacing ``code.namespace`` + ``code.function``) is stable from 1.33.0.
_SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.33.0"

#: Argument strings shorter than this are not redacted from exception text (they would
#: match ordinary words and line numbers; a secret is longer).
_MIN_REDACTED_LENGTH: Final = 4
_REDACTED: Final = "[redacted]"
#: Items looked at inside each container argument (a bound on the work on the failure path).
_MAX_REDACTED_ITEMS: Final = 100

#: How often an unset global provider is looked up again.
_RECHECK_SECONDS: Final = 1.0

_SECONDS_BUCKETS: Final = (
    *(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


def _is_noop_tracer_provider(provider: object) -> bool:
    return isinstance(provider, (NoOpTracerProvider, ProxyTracerProvider))


def _is_noop_meter_provider(provider: object) -> bool:
    return isinstance(provider, metrics.NoOpMeterProvider) or type(provider).__name__ in (
        "_ProxyMeterProvider",
        "NoOpMeterProvider",
    )


class _Instruments:
    """The metric instruments, and the tallies behind the observed ones.

    Counts and gauges are observable instruments read from plain per-name tallies at
    collection time: a task then costs a few dict updates instead of one SDK call per
    count (several microseconds each, more than running a short task). Only the two
    histograms are recorded as tasks run. Tallies are written on the event loop thread
    and copied (atomically, under the GIL) by the reader's thread.
    """

    def __init__(self, meter: metrics.Meter) -> None:
        self.added: dict[str, int] = {}
        self.finished: dict[tuple[str, str], int] = {}
        self.retries: dict[str, int] = {}
        self.pending: dict[str, int] = {}
        self.running: dict[str, int] = {}
        observed = (
            (meter.create_observable_counter, "added", _observe(self.added), "{task}",
             "Tasks added by requests."),
            (meter.create_observable_counter, "finished", _observe_outcomes(self.finished),
             "{task}", "Tasks that reached a terminal state, by outcome."),
            (meter.create_observable_counter, "retries", _observe(self.retries), "{attempt}",
             "Attempts that failed and were scheduled to run again."),
            (meter.create_observable_up_down_counter, "pending", _observe(self.pending),
             "{task}", "Tasks queued or waiting to retry."),
            (meter.create_observable_up_down_counter, "running", _observe(self.running),
             "{task}", "Tasks running now."),
        )  # fmt: skip
        for create, name, callback, unit, description in observed:
            create(
                f"after_response.task.{name}",
                callbacks=[callback],
                unit=unit,
                description=description,
            )
        self.duration = meter.create_histogram(
            "after_response.task.duration",
            unit="s",
            description="How long each attempt of a task ran, by outcome.",
            explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS,
        )
        self.queue_duration = meter.create_histogram(
            "after_response.task.queue.duration",
            unit="s",
            description="How long a task waited between being queued and starting to run.",
            explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS,
        )


def _observe(tally: dict[str, int]) -> Callable[[CallbackOptions], Iterator[Observation]]:
    def observe(options: CallbackOptions) -> Iterator[Observation]:
        for name, value in tally.copy().items():
            yield Observation(value, {"after_response.task.name": name})

    return observe


def _observe_outcomes(
    tally: dict[tuple[str, str], int],
) -> Callable[[CallbackOptions], Iterator[Observation]]:
    def observe(options: CallbackOptions) -> Iterator[Observation]:
        for (name, outcome), value in tally.copy().items():
            yield Observation(
                value, {"after_response.task.name": name, "after_response.task.outcome": outcome}
            )

    return observe


class Telemetry:
    """Spans, metrics and logs for one middleware, from explicit or global providers.

    Without explicit providers, the global ones are looked up again at most once a
    second until a real (SDK) provider is found, so an SDK configured after the
    middleware was built, at application start-up for instance, is picked up.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._tracer_for: object = None
        self._tracer: trace.Tracer | None = None
        self._tracer_next_check = 0.0
        self._tracer_settled = False
        self._instruments_for: object = None
        #: The instruments as of the last look at the provider (``instruments``): read on
        #: the per-task path, where looking again would cost a clock read each time.
        self.current_instruments: _Instruments | None = None
        self._instruments_next_check = 0.0
        self._instruments_settled = False
        #: The job of each open attempt span.
        self._attempt_jobs: dict[Span, Job] = {}

    @property
    def tracer(self) -> trace.Tracer | None:
        """The tracer to use now, or ``None`` when tracing is off."""
        if self._tracer_settled:
            return self._tracer
        # Looking the global provider up reads os.environ: do it at most once a second
        # until a real provider is set (a global provider can be set only once).
        now = time.monotonic()
        if now < self._tracer_next_check:
            return self._tracer
        self._tracer_next_check = now + _RECHECK_SECONDS
        provider = self._tracer_provider or trace.get_tracer_provider()
        if provider is not self._tracer_for:
            self._tracer_for = provider
            self._tracer = (
                None
                if _is_noop_tracer_provider(provider)
                else provider.get_tracer(
                    "after_response",
                    _version.VERSION,
                    schema_url=_SCHEMA_URL,
                )
            )
        self._tracer_settled = self._tracer_provider is not None or not isinstance(
            provider, ProxyTracerProvider
        )
        return self._tracer

    @property
    def instruments(self) -> _Instruments | None:
        """The metric instruments to use now, or ``None`` when metrics are off."""
        if self._instruments_settled:
            return self.current_instruments
        now = time.monotonic()
        if now < self._instruments_next_check:
            return self.current_instruments
        self._instruments_next_check = now + _RECHECK_SECONDS
        provider = self._meter_provider or metrics.get_meter_provider()
        if provider is not self._instruments_for:
            self._instruments_for = provider
            self.current_instruments = (
                None
                if _is_noop_meter_provider(provider)
                else _Instruments(
                    provider.get_meter("after_response", _version.VERSION, schema_url=_SCHEMA_URL)
                )
            )
        self._instruments_settled = (
            self._meter_provider is not None or type(provider).__name__ != "_ProxyMeterProvider"
        )
        return self.current_instruments

    # -- spans -----------------------------------------------------------------------------

    @contextmanager
    def attempt_span(self, job: Job, queue_wait: float) -> Iterator[Span | None]:
        """Open the span of one attempt of ``job`` as the current span, if tracing is on.

        Runs inside the job's copied context, so the span's parent is whatever span was
        current when ``add()`` was called.
        """
        tracer = self.tracer
        if tracer is None:
            yield None
            return
        with tracer.start_as_current_span(
            f"after_response {job.name}",
            kind=SpanKind.INTERNAL,
            attributes={
                **job.span_attributes,
                "after_response.task.attempt": job.attempt,
                "after_response.task.queue_duration": queue_wait,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            # end_attempt_span() needs the job's arguments, to keep them out of the span.
            self._attempt_jobs[span] = job
            try:
                yield span
            finally:
                del self._attempt_jobs[span]

    def end_attempt_span(
        self, span: Span | None, outcome: str, exc: BaseException | None = None
    ) -> None:
        """Mark an attempt span with its outcome (and error) before it ends."""
        if span is None:
            return
        span.set_attribute("after_response.task.outcome", outcome)
        if isinstance(exc, TaskTimeoutError):
            # A timed-out attempt that will be retried is a timeout too, not an exception.
            exc, error_type = None, "timeout"
        elif exc is not None and outcome in (FAILED, RETRY):
            error_type = _qualified_type(exc)
        elif outcome in (SUCCEEDED, DISCARDED):
            return
        else:
            error_type = _ERROR_TYPES.get(outcome, outcome)
        if exc is not None:
            job = self._attempt_jobs.get(span)
            span.record_exception(exc, attributes=_exception_attributes(exc, job))
        span.set_attribute("error.type", error_type)
        span.set_status(Status(_StatusCode.ERROR, _status_description(error_type, exc)))

    def record_unrun(self, job: Job, outcome: str) -> None:
        """Leave a zero-length span for a task that never ran (discarded, shed, abandoned)."""
        tracer = self.tracer
        if tracer is None:
            return

        def record() -> None:
            span = tracer.start_span(
                f"after_response {job.name}",
                kind=SpanKind.INTERNAL,
                attributes={**job.span_attributes, "after_response.task.attempt": job.attempt},
            )
            self.end_attempt_span(span, outcome)
            span.end()

        job.context.run(record)

    # -- logs ------------------------------------------------------------------------------

    def log(
        self,
        level: int,
        message: str,
        job: Job,
        *args: object,
        exc: BaseException | None = None,
        span: Span | None = None,
    ) -> None:
        """Log about ``job`` on the ``after_response`` logger, never with its arguments.

        ``extra`` carries the task name, the request's method and path, and the trace and
        span ids when a span is known, so a log backend can link the line to its trace.

        With ``exc``, the record carries the traceback as text (``exc_text``, which every
        ``logging.Formatter`` prints) with the task's arguments redacted, and the exception
        type as ``error_type``; not the exception object (``exc_info`` stays empty), whose
        message may quote an argument (``SMTPRecipientsRefused`` holds the address) and
        which formatters render unredacted. ``on_dead_letter`` receives the exception.
        """
        if not logger.isEnabledFor(level):
            return
        extra: dict[str, Any] = {
            "task_name": job.name,
            "request_method": job.request.method,
            "request_path": job.request.path,
        }
        extra.update(
            _trace_ids(span if span is not None else job.context.run(trace.get_current_span))
        )
        if exc is None:
            logger.log(level, message, *args, extra=extra)
            return
        extra["error_type"] = _qualified_type(exc)
        record = logger.makeRecord(
            logger.name, level, __file__, 0, message, args, None, "log", extra
        )
        record.exc_text = _exception_attributes(exc, job)["exception.stacktrace"].rstrip("\n")
        logger.handle(record)


def _trace_ids(span: Span) -> Mapping[str, str]:
    context = span.get_span_context()
    if not context.is_valid:
        return {}
    return {
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
    }


def _qualified_type(exc: BaseException) -> str:
    module = type(exc).__module__
    name = type(exc).__qualname__
    return name if module == "builtins" else f"{module}.{name}"


def _status_description(error_type: str, exc: BaseException | None) -> str:
    if exc is not None:
        return type(exc).__qualname__
    return {
        "timeout": "task timed out",
        "shed": "task shed: pending queue full",
        "abandoned": "task abandoned before it could finish",
    }.get(error_type, error_type)


def _exception_attributes(exc: BaseException, job: Job | None) -> dict[str, str]:
    """The exception event's message and stacktrace, with the task's arguments redacted.

    Exception messages often quote what the task was called with (smtplib's
    ``SMTPRecipientsRefused`` holds the address): the span must not carry it.
    """
    message = str(exc)
    stacktrace = "".join(traceback.format_exception(exc))
    if job is not None:
        for secret in _argument_strings(job.fn, job.args, job.kwargs):
            message = message.replace(secret, _REDACTED)
            stacktrace = stacktrace.replace(secret, _REDACTED)
    return {"exception.message": message, "exception.stacktrace": stacktrace}


def _argument_strings(
    fn: object, args: Iterable[object], kwargs: Mapping[str, object]
) -> list[str]:
    """The strings among a task's arguments (those bound by ``functools.partial`` too), and
    one level inside containers and dataclasses (a ``User`` with an ``email``), as they may
    appear in text, longest first."""
    found: set[str] = set()
    values = [*args, *kwargs.values()]
    while isinstance(fn, functools.partial):
        values += [*fn.args, *fn.keywords.values()]
        fn = fn.func

    def collect(value: object, depth: int) -> None:
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("utf-8", "replace")
        if isinstance(value, str):
            if len(value) >= _MIN_REDACTED_LENGTH:
                found.add(value)
                found.add(repr(value)[1:-1])  # as it appears inside a repr()
            return
        if depth > 0:
            return
        if isinstance(value, Mapping):
            items: Iterable[object] = (*value.keys(), *value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            items = (getattr(value, field.name) for field in dataclasses.fields(value))
        else:
            return
        for item in itertools.islice(items, _MAX_REDACTED_ITEMS):
            collect(item, depth + 1)

    for value in values:
        collect(value, 0)
    return sorted(found, key=len, reverse=True)
