"""Per side effect limits: how many of one task name run at once, and how often one starts.

A :class:`LimitGate` holds the state of every *limited* task name of one dispatcher (the
executor of a web process, the runner of an engine worker). A name without limits never
reaches the gate (its options' ``limits_from_options`` is ``None``), so it costs nothing and
allocates nothing.

Rates are enforced over a *sliding window*: ``"10/s"`` means that no one-second window, wherever
it starts, holds more than ten starts. Bursts are allowed up to the count: ten tasks added at
once after a quiet second start at once, the eleventh one second after the first. This is
stricter than a token bucket with a burst of ``count`` (which may start up to ``2 * count`` in
one window: a full bucket spent at the end of a window, then the refill), so a downstream's own
limit of "10 per second" is never exceeded, whatever window it counts in. The gate remembers
the last ``count`` start times of a rate-limited name (8 bytes each).
"""

from __future__ import annotations

import math
import re
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from ._checks import check_int, check_seconds

T = TypeVar("T")

MAX_RATE_COUNT: Final = 1_000_000
"""The largest count of a rate: the gate keeps one start time per allowed call."""

_UNITS: Final = {
    "ms": 0.001,
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
}
_RATE: Final = re.compile(
    r"\s*(?P<count>[0-9.]+)\s*/\s*(?P<period>[0-9]*\.?[0-9]+)?\s*(?P<unit>[A-Za-z]+)\s*"
)
_EXAMPLES: Final = "for example '10/s', '100/min', '3600/h', '10/2s' or '5/500ms'"


@dataclass(frozen=True)
class Rate:
    """At most ``count`` task starts in any window of ``per_seconds`` seconds.

    Raises:
        TypeError: when ``count`` is not an int or ``per_seconds`` not a number.
        ValueError: when ``count`` is not from 1 to ``MAX_RATE_COUNT`` or ``per_seconds``
            is not a positive finite number.
    """

    count: int
    per_seconds: float

    def __post_init__(self) -> None:
        count_range = f"a whole number of calls from 1 to {MAX_RATE_COUNT:,}"
        if not 1 <= check_int("a rate's count", self.count, count_range) <= MAX_RATE_COUNT:
            raise ValueError(f"a rate's count must be {count_range}, got {self.count!r}")
        check_seconds("a rate's per_seconds", self.per_seconds, or_none=False)

    def __str__(self) -> str:
        return f"{self.count}/{self.per_seconds:g}s"


def parse_rate(text: str | None) -> Rate | None:
    """Read a rate limit written as ``"<count>/<period>"``; ``None`` stays ``None``.

    ``count`` is a whole number of task starts. ``period`` is an optional positive number
    followed by a unit: ``ms``; ``s``, ``sec``, ``second(s)``; ``m``, ``min``, ``minute(s)``;
    ``h``, ``hr``, ``hour(s)``; ``d``, ``day(s)``. Spaces around the parts are ignored and the
    unit is case-insensitive. Examples: ``"10/s"``, ``"100/m"``, ``"5/min"``, ``"3600/h"``,
    ``"10/2s"``, ``"5/500ms"``, ``"1/1.5s"``. A fractional count is refused: write ``"5/2s"``
    for two and a half a second.

    Raises:
        TypeError: when ``text`` is not a string.
        ValueError: when it does not follow that grammar, naming the text and giving examples.
    """
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(
            f"a rate limit is written as a string, {_EXAMPLES}; got {type(text).__name__}"
        )
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid rate limit {text!r}: expected '<count>/<period>', {_EXAMPLES}")
    count_text, period_text, unit = match["count"], match["period"], match["unit"]
    if not count_text.isdigit():
        raise ValueError(
            f"invalid rate limit {text!r}: the count must be a whole number of calls;"
            " spread a fractional rate over a longer period, for example '5/2s' for 2.5 a second"
        )
    unit_seconds = _UNITS.get(unit.lower())
    if unit_seconds is None:
        raise ValueError(
            f"invalid rate limit {text!r}: unknown unit {unit!r}; use ms, s, min, h or d,"
            f" {_EXAMPLES}"
        )
    count = int(count_text)
    per_seconds = (1.0 if period_text is None else float(period_text)) * unit_seconds
    if count == 0 or per_seconds == 0:
        raise ValueError(
            f"invalid rate limit {text!r}: the count and the period must be > 0, {_EXAMPLES}"
        )
    if count > MAX_RATE_COUNT:
        raise ValueError(
            f"invalid rate limit {text!r}: at most {MAX_RATE_COUNT:,} calls per period are"
            " supported; use a shorter period with a proportional count"
        )
    return Rate(count, per_seconds)


@dataclass(frozen=True)
class Limits:
    """The limits of one task name: concurrent runs and starts per period; ``None`` is no limit.

    Raises:
        TypeError: when ``max_concurrency`` is not an int, or ``rate`` is not a :class:`Rate`
            (use :func:`parse_rate` for text).
        ValueError: when ``max_concurrency`` is less than 1.
    """

    max_concurrency: int | None = None
    rate: Rate | None = None

    def __post_init__(self) -> None:
        expected = "a whole number of at least 1, or None for no limit"
        limit = self.max_concurrency
        if limit is not None and check_int("max_concurrency", limit, expected) < 1:
            raise ValueError(f"max_concurrency must be {expected}; got {limit!r}")
        if self.rate is not None and not isinstance(self.rate, Rate):
            raise TypeError(
                f"Limits(rate=...) expects a Rate or None, got {type(self.rate).__name__};"
                " turn text into a Rate with parse_rate('10/s')"
            )


class _Name(Generic[T]):
    """The state of one limited task name."""

    __slots__ = ("limits", "oldest", "per_seconds", "running", "starts", "waiting")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.running = 0
        # A ring of the last ``count`` start times; ``starts[oldest]`` is the oldest of them.
        self.starts: array[float] | None = None
        self.oldest = 0
        self.per_seconds = 0.0
        self.waiting: deque[T] = deque()
        if limits.rate is not None:
            self.starts = array("d", [-math.inf]) * limits.rate.count
            self.per_seconds = limits.rate.per_seconds

    def retune(self, limits: Limits) -> None:
        """Take new limits, keeping the most recent start times."""
        if limits.rate != self.limits.rate:
            recent = [] if self.starts is None else list(self._chronological())
            self.starts, self.oldest = None, 0
            if limits.rate is not None:
                count = limits.rate.count
                kept = recent[-count:]
                self.starts = array("d", [-math.inf] * (count - len(kept)) + kept)
                self.per_seconds = limits.rate.per_seconds
        self.limits = limits

    def _chronological(self) -> Iterator[float]:
        assert self.starts is not None
        ring, oldest = self.starts, self.oldest
        yield from ring[oldest:]
        yield from ring[:oldest]

    def take(self, now: float) -> float:
        """Take a slot and a start, or say how long until they may be free (no change)."""
        limit = self.limits.max_concurrency
        if limit is not None and self.running >= limit:
            return math.inf
        ring = self.starts
        if ring is not None:
            oldest = self.oldest
            free_at = ring[oldest] + self.per_seconds
            if now < free_at:
                return free_at - now
            ring[oldest] = now
            self.oldest = oldest + 1 if oldest + 1 < len(ring) else 0
        self.running += 1
        return 0.0

    def free_at(self) -> float | None:
        """When the head of the waiting line may start, if time alone can tell."""
        limit = self.limits.max_concurrency
        if limit is not None and self.running >= limit:
            return None  # a release wakes it
        if self.starts is None:
            return -math.inf  # free now: the dispatcher missed a wake-up
        return self.starts[self.oldest] + self.per_seconds


class LimitGate(Generic[T]):
    """The limit state of all limited task names of one executor, and their waiting lines.

    The dispatcher's protocol, per task of a name that has :class:`Limits`:

    1. ``try_acquire(name, limits, now)``; ``0.0``: start it (it now holds a slot and a start).
       Otherwise :meth:`park` it: it waits in its name's FIFO line, holding no global slot.
    2. When it ends, :meth:`release` its name, then start whatever ``unpark_ready(name, now)``
       returns (those items already hold their slot and start, in FIFO order).
    3. Keep one timer at :meth:`next_wakeup`; when it fires, start what :meth:`unpark_due`
       returns, and set the timer again.
    4. A parked item that stops waiting (its waiter was cancelled) leaves with :meth:`withdraw`.

    Every operation on one name is O(1) (``unpark_*`` per item returned); ``next_wakeup`` and
    ``unpark_due`` look at the names that have waiting items. ``now`` is any monotonic clock,
    the same for every call. Not thread-safe: call it from the event loop's thread.
    """

    def __init__(self) -> None:
        self._names: dict[str, _Name[T]] = {}
        self._lined_up: dict[str, _Name[T]] = {}  # names with waiting items, in park order
        self._parked = 0

    @property
    def parked(self) -> int:
        """How many items wait in all lines."""
        return self._parked

    def running(self, name: str) -> int:
        """How many tasks of ``name`` hold a slot (acquired and not yet released)."""
        state = self._names.get(name)
        return 0 if state is None else state.running

    def try_acquire(self, name: str, limits: Limits, now: float) -> float:
        """Take a slot and a start for one task of ``name``; ``0.0`` when it may start now.

        Otherwise nothing is taken and the result is the number of seconds until it might
        start: ``math.inf`` when it waits for a release (no free slot, or others of its name
        already wait in line, ahead of it). The latest ``limits`` given for a name apply.
        """
        state = self._names.get(name)
        if state is None:
            state = self._names[name] = _Name(limits)
        elif state.limits is not limits and state.limits != limits:
            state.retune(limits)
        if state.waiting:
            return math.inf
        return state.take(now)

    def release(self, name: str) -> None:
        """Give back the slot of a task of ``name`` that ended (whatever its outcome).

        Raises:
            RuntimeError: when no task of ``name`` holds a slot.
        """
        state = self._names.get(name)
        if state is None or state.running == 0:
            raise RuntimeError(
                f"release({name!r}) without a matching try_acquire: no task of it holds a slot"
            )
        state.running -= 1

    def park(self, name: str, item: T) -> None:
        """Put ``item`` at the end of its name's line; call after a non-zero ``try_acquire``.

        Raises:
            RuntimeError: when ``try_acquire`` was never called for ``name``.
        """
        state = self._names.get(name)
        if state is None:
            raise RuntimeError(f"park({name!r}) before any try_acquire({name!r}, ...)")
        if not state.waiting:
            self._lined_up[name] = state
        state.waiting.append(item)
        self._parked += 1

    def unpark_ready(self, name: str, now: float) -> list[T]:
        """Take from the head of ``name``'s line the items that may start now, in FIFO order.

        Each returned item holds a slot and a start: run it, then :meth:`release` it.
        """
        state = self._lined_up.get(name)
        if state is None:
            return []
        waiting = state.waiting
        ready: list[T] = []
        while waiting and state.take(now) == 0.0:
            ready.append(waiting.popleft())
        self._parked -= len(ready)
        if not waiting:
            del self._lined_up[name]
        return ready

    def withdraw(self, name: str, item: T) -> None:
        """Take ``item`` out of ``name``'s line: it stopped waiting, holding nothing.

        Raises:
            ValueError: when ``item`` does not wait in that line.
        """
        state = self._lined_up.get(name)
        if state is None or item not in state.waiting:
            raise ValueError(f"withdraw({name!r}, ...) of an item that does not wait in its line")
        state.waiting.remove(item)
        self._parked -= 1
        if not state.waiting:
            del self._lined_up[name]

    def unpark_due(self, now: float) -> list[T]:
        """Take the items of every name that may start now (for the :meth:`next_wakeup` timer)."""
        ready: list[T] = []
        for name in list(self._lined_up):
            ready += self.unpark_ready(name, now)
        return ready

    def next_wakeup(self) -> float | None:
        """The earliest time, on the ``now`` clock, when a waiting item may start without a
        release; ``None`` when every waiting item waits for a release (or none waits)."""
        earliest: float | None = None
        for state in self._lined_up.values():
            free_at = state.free_at()
            if free_at is not None and (earliest is None or free_at < earliest):
                earliest = free_at
        return earliest

    def take_parked(self) -> list[T]:
        """Empty every line and return its items in park order per name (for shutdown)."""
        items = [item for state in self._lined_up.values() for item in state.waiting]
        for state in self._lined_up.values():
            state.waiting.clear()
        self._lined_up.clear()
        self._parked = 0
        return items
