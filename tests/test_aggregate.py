"""No log storms: the first line of a task name and reason per interval, then one summary."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import anyio
import pytest

from after_response._aggregate import LogAggregator

SHED = "after-response task %s of %s %s shed: %s"


class Lines(logging.Handler):
    """Keeps the records a logger writes, and calls ``notify`` after each one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.notify: Callable[[], None] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.notify is not None:
            self.notify()

    def summaries(self) -> list[logging.LogRecord]:
        return [record for record in self.records if hasattr(record, "aggregated_count")]

    def full(self) -> list[logging.LogRecord]:
        return [record for record in self.records if not hasattr(record, "aggregated_count")]


@pytest.fixture
def logger(request: pytest.FixtureRequest) -> Iterator[logging.Logger]:
    """A logger of the test's own, writing to a ``Lines`` handler and nowhere else."""
    logger = logging.getLogger(f"after_response.tests.{request.node.name}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = Lines()
    logger.addHandler(handler)
    yield logger
    logger.removeHandler(handler)


def lines(logger: logging.Logger) -> Lines:
    [handler] = [handler for handler in logger.handlers if isinstance(handler, Lines)]
    return handler


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def shed(aggregator: LogAggregator, name: str, number: int, level: int = logging.ERROR) -> None:
    aggregator.emit(
        level,
        (name, "shed"),
        SHED,
        (f"#{number}", name, "POST /signup", "the queue stayed full"),
        {"task_name": name, "task_id": number},
    )


def written_and_counted(handler: Lines) -> int:
    """Lines written in full plus the lines the summaries stand for."""
    counted: int = sum(record.aggregated_count for record in handler.summaries())  # type: ignore[attr-defined]
    return len(handler.full()) + counted


@pytest.mark.parametrize("interval", [5.0, 0.02])
def test_a_flood_writes_a_bounded_number_of_lines_and_counts_every_one(
    logger: logging.Logger, interval: float
) -> None:
    aggregator = LogAggregator(logger, interval)
    names = ["send_email", "sync_crm", "track"]
    started = time.monotonic()
    for number in range(100_000):
        shed(aggregator, names[number % 3], number)
    aggregator.flush()
    elapsed = time.monotonic() - started
    handler = lines(logger)
    # Intervals do not overlap and each lasts `interval`; per interval and name, at most the
    # first line and one summary.
    intervals = math.floor(elapsed / interval) + 1
    assert len(handler.records) <= 2 * len(names) * intervals
    assert written_and_counted(handler) == 100_000
    if elapsed < interval:
        assert len(handler.records) == 2 * len(names)


def test_the_first_line_is_written_in_full(logger: logging.Logger) -> None:
    aggregator = LogAggregator(logger)
    shed(aggregator, "send_email", 1, logging.WARNING)
    [record] = lines(logger).records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "after-response task #1 of send_email POST /signup shed: the queue stayed full"
    )
    assert (record.task_name, record.task_id) == ("send_email", 1)  # type: ignore[attr-defined]


def test_the_rest_of_an_interval_is_one_summary_per_name_and_reason(
    logger: logging.Logger,
) -> None:
    clock = Clock()
    aggregator = LogAggregator(logger, 5.0, clock=clock)
    for number in range(4_313):
        shed(aggregator, "send_email", number)
    for number in range(3):
        shed(aggregator, "sync_crm", number)
    for number in range(2):
        aggregator.emit(logging.ERROR, ("send_email", "abandoned"), "abandoned %s", (number,), {})
    assert len(lines(logger).records) == 3  # three first lines, nothing else yet
    clock.now += 5.0
    aggregator.flush()
    summaries = {
        (record.task_name, record.reason): record  # type: ignore[attr-defined]
        for record in lines(logger).summaries()
    }
    assert summaries.keys() == {
        ("send_email", "shed"),
        ("sync_crm", "shed"),
        ("send_email", "abandoned"),
    }
    email = summaries["send_email", "shed"]
    assert email.getMessage() == "... and 4,312 more tasks of send_email in the last 5.0s: shed"
    assert (email.aggregated_count, email.aggregated_seconds) == (4_312, 5.0)  # type: ignore[attr-defined]
    assert summaries["sync_crm", "shed"].aggregated_count == 2  # type: ignore[attr-defined]
    assert summaries["send_email", "abandoned"].aggregated_count == 1  # type: ignore[attr-defined]


def test_a_summary_of_failures_says_what_it_counts(logger: logging.Logger) -> None:
    # Not every flood is of tasks: a broker that stays down fails each publish.
    clock = Clock()
    aggregator = LogAggregator(logger, 5.0, clock=clock)
    key = ("publishing to celery", "kombu.exceptions.OperationalError")
    admitted = [aggregator.admit(logging.WARNING, key, counted="failures of") for _ in range(6)]
    assert admitted == [True] + [False] * 5
    clock.now += 5.0
    aggregator.flush()
    [summary] = lines(logger).summaries()
    assert summary.getMessage() == (
        "... and 5 more failures of publishing to celery in the last 5.0s: "
        "kombu.exceptions.OperationalError"
    )
    assert summary.subject == "publishing to celery"  # type: ignore[attr-defined]
    assert not hasattr(summary, "task_name")


def test_a_name_and_reason_seen_once_writes_no_summary(logger: logging.Logger) -> None:
    aggregator = LogAggregator(logger)
    shed(aggregator, "send_email", 1)
    shed(aggregator, "sync_crm", 1)
    aggregator.flush()
    assert len(lines(logger).records) == 2
    assert lines(logger).summaries() == []


@pytest.mark.parametrize("wakes", ["the next line", "flush_due"])
def test_without_a_loop_the_summary_is_written_once_the_interval_has_ended(
    logger: logging.Logger, wakes: str
) -> None:
    """Where no loop times it: by the next line after the interval, or by ``flush_due()``
    from a thread that wakes regularly (the store's writer)."""
    clock = Clock()
    aggregator = LogAggregator(logger, 5.0, clock=clock)

    def wake(number: int) -> None:
        if wakes == "flush_due":
            aggregator.flush_due()
        else:
            shed(aggregator, "send_email", number)

    for number in range(10):
        shed(aggregator, "send_email", number)
    clock.now += 4.9
    wake(10)
    assert lines(logger).summaries() == []  # the interval goes on
    clock.now += 0.1
    wake(11)
    summary, *after = lines(logger).records[1:]
    assert summary.aggregated_count == (10 if wakes == "the next line" else 9)  # type: ignore[attr-defined]
    assert summary.getMessage().endswith("in the last 5.0s: shed")
    # Then the new interval's first line in full; flush_due writes nothing more.
    assert [record.task_id for record in after] == ([11] if wakes == "the next line" else [])  # type: ignore[attr-defined]


def test_the_summary_keeps_the_highest_level_and_disabled_levels_are_not_counted(
    logger: logging.Logger,
) -> None:
    aggregator = LogAggregator(logger)
    shed(aggregator, "send_email", 1, logging.WARNING)
    shed(aggregator, "send_email", 2, logging.WARNING)
    shed(aggregator, "send_email", 3, logging.ERROR)
    shed(aggregator, "send_email", 4, logging.WARNING)
    logger.setLevel(logging.ERROR)
    shed(aggregator, "sync_crm", 1, logging.WARNING)
    shed(aggregator, "sync_crm", 2, logging.WARNING)
    aggregator.flush()
    first, summary = lines(logger).records
    assert (first.levelno, summary.levelno) == (logging.WARNING, logging.ERROR)
    assert summary.aggregated_count == 3  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_the_loop_writes_the_summary_when_the_interval_ends(
    logger: logging.Logger,
) -> None:
    loop = asyncio.get_running_loop()
    timers = len(loop._scheduled)  # type: ignore[attr-defined]
    aggregator = LogAggregator(logger, 0.05)
    for number in range(1_000):
        shed(aggregator, "send_email", number)
        shed(aggregator, "sync_crm", number)
    # One timer for the interval, not one per line left out.
    assert len(loop._scheduled) == timers + 1  # type: ignore[attr-defined]
    handler = lines(logger)
    both_summarised = asyncio.Event()

    def notify() -> None:
        if len(handler.summaries()) == 2:
            both_summarised.set()

    handler.notify = notify  # the timer writes on the loop's thread
    with anyio.fail_after(5):
        await both_summarised.wait()
    assert [record.aggregated_count for record in handler.summaries()] == [999, 999]  # type: ignore[attr-defined]
    aggregator.flush()
    assert len(handler.records) == 4


@pytest.mark.anyio
async def test_lines_counted_in_a_thread_without_a_loop_are_summarised_on_the_loop_given(
    logger: logging.Logger,
) -> None:
    aggregator = LogAggregator(logger, 0.05)
    aggregator.loop = asyncio.get_running_loop()
    handler = lines(logger)
    summarised = asyncio.Event()
    handler.notify = lambda: handler.summaries() and summarised.set()  # on the loop's thread

    def from_a_thread() -> None:
        for number in range(10):
            shed(aggregator, "send_email", number)

    await anyio.to_thread.run_sync(from_a_thread)
    with anyio.fail_after(5):
        await summarised.wait()
    [summary] = handler.summaries()
    assert summary.aggregated_count == 9  # type: ignore[attr-defined]


def test_a_closed_loop_leaves_the_summary_to_the_next_line(logger: logging.Logger) -> None:
    clock = Clock()
    aggregator = LogAggregator(logger, 5.0, clock=clock)
    loop = asyncio.new_event_loop()
    loop.close()
    aggregator.loop = loop
    shed(aggregator, "send_email", 1)
    shed(aggregator, "send_email", 2)
    clock.now += 5.0
    shed(aggregator, "send_email", 3)
    assert [r.aggregated_count for r in lines(logger).summaries()] == [1]  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_a_flush_before_the_interval_ends_leaves_the_timer_nothing_to_write(
    logger: logging.Logger,
) -> None:
    aggregator = LogAggregator(logger, 0.01)
    shed(aggregator, "send_email", 1)
    shed(aggregator, "send_email", 2)
    aggregator.flush()
    assert len(lines(logger).records) == 2
    timer_ran = asyncio.Event()
    asyncio.get_running_loop().call_later(0.02, timer_ran.set)  # runs after the summary timer
    with anyio.fail_after(5):
        await timer_ran.wait()
    assert len(lines(logger).records) == 2


def test_lines_from_many_threads_are_all_counted(logger: logging.Logger) -> None:
    aggregator = LogAggregator(logger, 0.01)

    def flood(name: str) -> None:
        for number in range(5_000):
            shed(aggregator, name, number)

    threads = [threading.Thread(target=flood, args=(name,)) for name in ("a", "b", "c", "d") * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    aggregator.flush()
    handler = lines(logger)
    assert written_and_counted(handler) == 40_000
    per_name = Counter(record.task_name for record in handler.full())  # type: ignore[attr-defined]
    for record in handler.summaries():
        per_name[record.task_name] += record.aggregated_count  # type: ignore[attr-defined]
    assert per_name == dict.fromkeys("abcd", 10_000)


@pytest.mark.parametrize(
    ("interval", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (True, TypeError),
        ("5", TypeError),
        (None, TypeError),
    ],
)
def test_a_bad_interval_is_refused(
    logger: logging.Logger, interval: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="positive number of seconds"):
        LogAggregator(logger, interval)  # type: ignore[arg-type]


def test_a_batch_of_lines_writes_its_first_and_counts_the_rest(logger: logging.Logger) -> None:
    # Tasks shed together for one reason are one question: the first may be written, the
    # others are counted, and a later batch of the same key in the interval is all counted.
    clock = Clock()
    aggregator = LogAggregator(logger, 5.0, clock=clock)
    assert aggregator.admit(logging.ERROR, ("send_email", "shed"), count=50)
    assert not aggregator.admit(logging.WARNING, ("send_email", "shed"), count=30)
    assert aggregator.admit(logging.ERROR, ("sync_crm", "shed"), count=1)
    clock.now += 5.0
    aggregator.flush()
    [summary] = lines(logger).summaries()
    assert summary.getMessage() == "... and 79 more tasks of send_email in the last 5.0s: shed"
    assert summary.levelno == logging.ERROR
