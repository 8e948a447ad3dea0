"""Metrics: counts and gauges observed from plain per-name tallies, and two histograms."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from operator import attrgetter
from typing import Final

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from ._task import OUTCOME_VALUES

_SECONDS_BUCKETS: Final = (
    *(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


def is_noop_meter_provider(provider: object) -> bool:
    return isinstance(provider, metrics.NoOpMeterProvider) or type(provider).__name__ in (
        "_ProxyMeterProvider",
        "NoOpMeterProvider",
    )


class Instruments:
    """The metric instruments, and the tallies behind the observed ones.

    Counts and gauges are observable instruments read from plain per-name tallies at
    collection time: a task then costs a few increments on its name's tally instead of one
    SDK call per count (several microseconds each, more than running a short task). Only
    the two histograms are recorded as tasks run. Tallies are written on the event loop
    thread (or an engine worker's) and read by the metric reader's thread.
    """

    def __init__(self, meter: metrics.Meter) -> None:
        #: The per-task counts and gauges, one tally per task name.
        self.names: dict[str, NameTally] = {}
        names = self.names
        observed = (
            (meter.create_observable_counter, "added", _observe(names, "added"), "{task}",
             "Tasks added by requests."),
            (meter.create_observable_counter, "finished", _observe_outcomes(names),
             "{task}", "Tasks that reached a terminal state, by outcome."),
            (meter.create_observable_counter, "retries", _observe(names, "retries"),
             "{attempt}", "Attempts that failed and were scheduled to run again."),
            (meter.create_observable_up_down_counter, "pending",
             _observe(names, "pending", zeros=True), "{task}",
             "Tasks queued or waiting to retry."),
            (meter.create_observable_up_down_counter, "running",
             _observe(names, "running", zeros=True), "{task}", "Tasks running now."),
            (meter.create_observable_counter, "loop_blocked", _observe(names, "loop_blocked"),
             "{event}", "Times a side effect held the event loop past the threshold."),
            (meter.create_observable_counter, "stored", _observe(names, "stored"), "{task}",
             "Durable tasks committed to the store."),
            (meter.create_observable_counter, "recovered", _observe(names, "recovered"),
             "{task}", "Durable tasks taken over from a process that died."),
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

    def tally(self, name: str) -> NameTally:
        """The tally of the tasks named ``name`` (made on first sight of the name)."""
        try:
            return self.names[name]
        except KeyError:
            tally = self.names[name] = NameTally(name, self)
            return tally


class NameTally:
    """The counts of one task name, which its tasks point to: a task's step costs an
    attribute increment, and its histograms' attributes are built once per name."""

    __slots__ = (
        "added",
        "duration",
        "finished",
        "loop_blocked",
        "name",
        "name_attributes",
        "outcome_attributes",
        "pending",
        "queue_duration",
        "recovered",
        "retries",
        "running",
        "stored",
    )

    def __init__(self, name: str, instruments: Instruments) -> None:
        self.name = name
        self.added = self.pending = self.running = self.retries = 0
        self.loop_blocked = self.stored = self.recovered = 0
        #: Terminal tasks by outcome (``Outcome`` values): every outcome from 0.
        self.finished = dict.fromkeys(OUTCOME_VALUES, 0)
        self.duration = instruments.duration
        self.queue_duration = instruments.queue_duration
        # Handed to the SDK on every record and never changed.
        self.name_attributes = {"after_response.task.name": name}
        self.outcome_attributes = {
            outcome: {"after_response.task.name": name, "after_response.task.outcome": outcome}
            for outcome in OUTCOME_VALUES
        }


def _observe(
    names: dict[str, NameTally], field: str, *, zeros: bool = False
) -> Callable[[CallbackOptions], Iterator[Observation]]:
    """One count of every task name: a counter's names that counted at least one, or (with
    ``zeros``, for a gauge) every task name added so far. A task is counted only if metrics
    were on when it was added, in and out alike, so a gauge never ends below 0."""
    read = attrgetter(field)

    def observe(options: CallbackOptions) -> Iterator[Observation]:
        for tally in list(names.values()):
            value = read(tally)
            if value or zeros:
                yield Observation(value, tally.name_attributes)

    return observe


def _observe_outcomes(
    names: dict[str, NameTally],
) -> Callable[[CallbackOptions], Iterator[Observation]]:
    def observe(options: CallbackOptions) -> Iterator[Observation]:
        for tally in list(names.values()):
            for outcome, value in tally.finished.copy().items():
                if value:
                    yield Observation(value, tally.outcome_attributes[outcome])

    return observe
