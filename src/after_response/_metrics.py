"""Metrics: counts and gauges observed from plain per-name tallies, and two histograms."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

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
    collection time: a task then costs a few dict updates instead of one SDK call per
    count (several microseconds each, more than running a short task). Only the two
    histograms are recorded as tasks run. Tallies are written on the event loop thread
    and copied (atomically, under the GIL) by the reader's thread.
    """

    def __init__(self, meter: metrics.Meter) -> None:
        self.added: dict[str, int] = {}
        self.finished: dict[tuple[str, str], int] = {}  # (task name, outcome)
        self.retries: dict[str, int] = {}
        self.pending: dict[str, int] = {}
        self.running: dict[str, int] = {}
        self.loop_blocked: dict[str, int] = {}
        self.stored: dict[str, int] = {}
        self.recovered: dict[str, int] = {}
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
            (meter.create_observable_counter, "loop_blocked", _observe(self.loop_blocked),
             "{event}", "Times a side effect held the event loop past the threshold."),
            (meter.create_observable_counter, "stored", _observe(self.stored), "{task}",
             "Durable tasks committed to the store."),
            (meter.create_observable_counter, "recovered", _observe(self.recovered), "{task}",
             "Durable tasks taken over from a process that died."),
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
