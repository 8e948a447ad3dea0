"""No log storms: repeated lines about tasks of one name and reason are counted, not written.

The rule, for the lines a flood repeats (tasks shed, discarded, abandoned, released): the lines
are keyed by ``(task name, reason)``. Within an interval, the first line of each key is written
in full; the further lines of that key are only counted, and when the interval ends ONE summary
line per key tells how many were left out::

    ... and 4,312 more tasks of send_email in the last 5.0s: shed

with ``extra={"task_name": ..., "reason": ..., "aggregated_count": 4312,
"aggregated_seconds": 5.0}``, at the highest level among the lines it stands for. An interval
opens with the first line after a quiet spell and lasts ``interval`` seconds, the same for every
key; the next line of a key after it is written in full again. So a key writes at most two
lines per interval, whatever the flood, and every line is either written or counted in a
summary. Counts, metrics, spans and dead-letter calls are not aggregated: the caller records
them per task before it calls :meth:`LogAggregator.emit`.

The summary is written by a timer on the running asyncio loop (one ``call_later`` per interval,
set only when a line was left out); where the emitting thread runs no asyncio loop (the
dead-letter hook's thread), on :attr:`LogAggregator.loop` if one was given; else (trio) by the
first line emitted after the interval. :meth:`LogAggregator.flush` writes what is pending at
once (at shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from ._checks import check_seconds

SUMMARY: Final = "... and %s more %s %s in the last %.1fs: %s"
"""The summary line: left-out count (with thousands separators), what was counted ("tasks
of"), the key's subject (a task name), seconds, reason."""
TASKS: Final = "tasks of"
#: What retried attempts' summaries count: one task may fail several attempts.
ATTEMPTS: Final = "attempts of"


class _Key:
    """What the interval knows of one key: its first line's time and the lines left out."""

    __slots__ = ("count", "counted", "level", "since")

    def __init__(self, since: float, counted: str) -> None:
        self.since = since
        self.counted = counted
        self.count = 0
        self.level = logging.NOTSET


class LogAggregator:
    """Writes the first line of each ``(task name, reason)`` per interval, summarises the rest.

    Args:
        logger: where the lines go.
        interval: the length of an interval in seconds.
        clock: the monotonic clock intervals are measured on (tests pass their own).

    Raises:
        TypeError: when ``interval`` is not a number.
        ValueError: when it is not a positive number of seconds.

    Thread-safe: lines may be emitted from worker threads and the loop alike.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 5.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_seconds("the log aggregation interval", interval, or_none=False)
        self._logger = logger
        self._interval = float(interval)
        self._clock = clock
        # Reentrant: a handler that logs through this aggregator must not deadlock.
        self._lock = threading.RLock()
        self._keys: dict[tuple[str, str], _Key] = {}
        self._ends_at: float | None = None  # the end of the open interval, if one is open
        self._timer_for: float | None = None  # the interval end a loop timer is set for
        #: The asyncio loop that times the summaries of lines counted in threads that run no
        #: loop of their own (the dead-letter hook's): its owner's, while it serves.
        self.loop: asyncio.AbstractEventLoop | None = None

    def emit(
        self,
        level: int,
        key: tuple[str, str],
        message: str,
        args: tuple[object, ...] = (),
        extra: dict[str, Any] | None = None,
        *,
        counted: str = TASKS,
    ) -> None:
        """Write ``message % args`` with ``extra`` if it is the first of ``key`` in the
        interval, else count it for the interval's summary.

        ``key`` is ``(task name, reason)``, or ``(subject, reason)`` with what the summary
        ``counted`` ("failures of": "... and 5 more failures of the durable store"); the
        reason is a short, fixed text ("shed", "abandoned: shutdown_timeout elapsed") that
        ends the summary line. Nothing is counted at a level the logger does not write.
        """
        if self.admit(level, key, counted=counted):
            self._logger.log(level, message, *args, extra=extra)

    def admit(
        self, level: int, key: tuple[str, str], *, counted: str = TASKS, count: int = 1
    ) -> bool:
        """Whether a line of ``key`` is to be written now (the first in the interval);
        otherwise it is counted for the summary. For callers that build the line only when
        it is written: under a flood, most are not. ``counted`` says what the summary counts,
        before the key's subject (``"failures of"``: "... and 5 more failures of publishing to
        celery"). ``count`` lines of ``key`` at once (a batch of tasks shed for one reason):
        the first may be written, the others are counted."""
        if not self._logger.isEnabledFor(level):
            return False
        now = self._clock()
        with self._lock:
            ends_at = self._ends_at
            if ends_at is not None and now >= ends_at:
                self._summarise(now)
                ends_at = None
            if ends_at is None:
                ends_at = self._ends_at = now + self._interval
            seen = self._keys.get(key)
            if seen is None:
                seen = self._keys[key] = _Key(now, counted)
                if count == 1:
                    return True
                written, count = True, count - 1
            else:
                written = False
            seen.count += count
            if level > seen.level:
                seen.level = level
            if self._timer_for != ends_at:
                self._set_timer(ends_at, now)
            return written

    def flush(self) -> None:
        """Write the summaries of the open interval now, and close it."""
        with self._lock:
            if self._ends_at is not None:
                self._summarise(self._clock())

    def flush_due(self) -> None:
        """Write the summaries of an interval that has ended: for a thread that runs no
        loop but wakes regularly (the store's writer), instead of a timer."""
        with self._lock:
            ends_at = self._ends_at
            if ends_at is not None:
                now = self._clock()
                if now >= ends_at:
                    self._summarise(now)

    def _set_timer(self, ends_at: float, now: float) -> None:
        # The non-raising form: from a worker thread, raising and catching costs a microsecond.
        loop = asyncio._get_running_loop()
        delay = max(ends_at - now, 0.0)
        if loop is not None:
            self._timer_for = ends_at
            loop.call_later(delay, self._on_timer)
            return
        loop = self.loop
        if loop is None:
            return  # no loop to ask: the first line after the interval summarises
        try:
            loop.call_soon_threadsafe(loop.call_later, delay, self._on_timer)
        except RuntimeError:  # closed since: as without one
            return
        self._timer_for = ends_at

    def _on_timer(self) -> None:
        with self._lock:
            ends_at = self._ends_at
            self._timer_for = None
            if ends_at is None:
                return  # summarised already, by an emit or a flush
            now = self._clock()
            if now >= ends_at:
                self._summarise(now)
            else:  # the loop's clock ran ahead of ours by a hair: come back at the end
                self._set_timer(ends_at, now)

    def _summarise(self, now: float) -> None:
        log = self._logger.log
        for (subject, reason), seen in self._keys.items():
            if seen.count:
                seconds = now - seen.since
                log(
                    seen.level,
                    SUMMARY,
                    f"{seen.count:,}",
                    seen.counted,
                    subject,
                    seconds,
                    reason,
                    extra={
                        "task_name" if seen.counted in (TASKS, ATTEMPTS) else "subject": subject,
                        "reason": reason,
                        "aggregated_count": seen.count,
                        "aggregated_seconds": seconds,
                    },
                )
        self._keys.clear()
        self._ends_at = None
