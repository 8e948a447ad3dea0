"""Per task name limits: concurrency, sliding-window rates, FIFO lines, other names untouched."""

from __future__ import annotations

import asyncio
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from after_response._limits import LimitGate, Limits, Rate, parse_rate
from after_response._options import limits_from_options

# -- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "per_seconds"),
    [
        ("10/s", 10, 1.0),
        ("100/m", 100, 60.0),
        ("5/min", 5, 60.0),
        ("3600/h", 3600, 3600.0),
        ("1000/day", 1000, 86400.0),
        ("10/2s", 10, 2.0),
        ("5/500ms", 5, 0.5),
        ("1/1.5s", 1, 1.5),
        (" 7 / 30 Seconds ", 7, 30.0),
        ("2/.5s", 2, 0.5),
    ],
)
def test_parse_rate_reads_count_and_period(text: str, count: int, per_seconds: float) -> None:
    assert parse_rate(text) == Rate(count, per_seconds)


def test_parse_rate_keeps_none() -> None:
    assert parse_rate(None) is None


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("10", "expected '<count>/<period>'"),
        ("ten/s", "expected '<count>/<period>'"),
        ("10/", "expected '<count>/<period>'"),
        ("10 per second", "expected '<count>/<period>'"),
        ("-1/s", "expected '<count>/<period>'"),
        ("2.5/s", "whole number of calls"),
        ("10/fortnight", "unknown unit 'fortnight'"),
        ("0/s", "must be > 0"),
        ("10/0s", "must be > 0"),
        ("2000000/d", "at most 1,000,000 calls"),
    ],
)
def test_parse_rate_names_the_bad_text_and_shows_examples(text: str, names: str) -> None:
    with pytest.raises(ValueError, match="invalid rate limit") as caught:
        parse_rate(text)
    message = str(caught.value)
    assert repr(text) in message
    assert names in message
    assert "'10/s'" in message or "'5/2s'" in message or "proportional" in message


def test_parse_rate_refuses_a_number() -> None:
    with pytest.raises(TypeError, match=r"written as a string, for example '10/s'.*got int"):
        parse_rate(10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bad", "error", "got"),
    [
        (0, ValueError, "0"),
        (-1, ValueError, "-1"),
        (1.5, TypeError, "float"),
        (True, TypeError, "bool"),
        ("3", TypeError, "str"),
    ],
)
def test_limits_refuse_a_bad_max_concurrency(bad: object, error: type[Exception], got: str) -> None:
    with pytest.raises(error, match=f"max_concurrency must be .* got {got}$"):
        Limits(max_concurrency=bad)  # type: ignore[arg-type]


def test_limits_refuse_rate_text() -> None:
    with pytest.raises(TypeError, match=r"parse_rate\('10/s'\)"):
        Limits(rate="10/s")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("count", "per", "error"),
    [
        (0, 1.0, ValueError),
        (1, 0.0, ValueError),
        (1, math.inf, ValueError),
        (1.5, 1.0, TypeError),
        (1, "1s", TypeError),
    ],
)
def test_rate_refuses_bad_values(count: object, per: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="a rate's"):
        Rate(count, per)  # type: ignore[arg-type]


def test_options_without_limits_give_none() -> None:
    assert limits_from_options() is None
    assert limits_from_options(3, "2/s") == Limits(3, Rate(2, 1.0))
    assert limits_from_options(rate_limit=Rate(1, 2.0)) == Limits(None, Rate(1, 2.0))


# -- the gate on a controlled clock ---------------------------------------------------------


def test_concurrency_limit_parks_and_release_wakes_in_fifo_order() -> None:
    gate: LimitGate[str] = LimitGate()
    limits = Limits(max_concurrency=2)
    assert gate.try_acquire("crm", limits, 0.0) == 0.0
    assert gate.try_acquire("crm", limits, 0.0) == 0.0
    assert gate.try_acquire("crm", limits, 0.0) == math.inf
    gate.park("crm", "third")
    assert gate.try_acquire("crm", limits, 0.0) == math.inf
    gate.park("crm", "fourth")
    assert gate.next_wakeup() is None  # only a release can wake them
    assert gate.parked == 2
    gate.release("crm")
    assert gate.unpark_ready("crm", 0.0) == ["third"]
    assert gate.unpark_ready("crm", 0.0) == []
    gate.release("crm")
    gate.release("crm")
    assert gate.unpark_ready("crm", 0.0) == ["fourth"]
    assert (gate.parked, gate.running("crm")) == (0, 1)


def test_a_newcomer_does_not_overtake_the_line() -> None:
    gate: LimitGate[str] = LimitGate()
    limits = Limits(rate=Rate(1, 1.0))
    assert gate.try_acquire("crm", limits, 0.0) == 0.0
    assert gate.try_acquire("crm", limits, 0.25) == 0.75
    gate.park("crm", "second")
    assert gate.next_wakeup() == 1.0
    # Its start is free by now, but "second" waits ahead of it.
    assert gate.try_acquire("crm", limits, 1.0) == math.inf
    gate.park("crm", "third")
    assert gate.unpark_due(1.0) == ["second"]
    assert gate.next_wakeup() == 2.0
    assert gate.unpark_due(1.999) == []
    assert gate.unpark_due(2.0) == ["third"]
    assert gate.next_wakeup() is None


def test_a_burst_up_to_the_count_starts_at_once_then_one_per_freed_start() -> None:
    gate: LimitGate[int] = LimitGate()
    limits = Limits(rate=Rate(3, 1.0))
    assert [gate.try_acquire("sms", limits, 10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert gate.try_acquire("sms", limits, 10.5) == 0.5
    assert gate.try_acquire("sms", limits, 11.0) == 0.0


def test_releases_of_a_rate_limited_name_do_not_give_starts_back() -> None:
    gate: LimitGate[int] = LimitGate()
    limits = Limits(max_concurrency=5, rate=Rate(1, 1.0))
    assert gate.try_acquire("sms", limits, 0.0) == 0.0
    gate.release("sms")
    assert gate.try_acquire("sms", limits, 0.5) == 0.5


def test_unlimited_names_and_other_names_are_not_held_by_a_full_one() -> None:
    gate: LimitGate[str] = LimitGate()
    assert gate.try_acquire("crm", Limits(max_concurrency=1), 0.0) == 0.0
    assert gate.try_acquire("crm", Limits(max_concurrency=1), 0.0) == math.inf
    gate.park("crm", "waits")
    assert gate.try_acquire("sms", Limits(max_concurrency=1), 0.0) == 0.0
    assert limits_from_options() is None  # what an unlimited task carries: no gate call at all


def test_new_limits_for_a_name_apply_and_keep_its_recent_starts() -> None:
    gate: LimitGate[int] = LimitGate()
    assert gate.try_acquire("crm", Limits(rate=Rate(2, 1.0)), 0.0) == 0.0
    assert gate.try_acquire("crm", Limits(rate=Rate(2, 1.0)), 0.1) == 0.0
    assert gate.try_acquire("crm", Limits(rate=Rate(3, 1.0)), 0.2) == 0.0
    assert gate.try_acquire("crm", Limits(rate=Rate(3, 1.0)), 0.3) == pytest.approx(0.7)
    assert gate.try_acquire("crm", Limits(rate=Rate(1, 1.0)), 0.3) == pytest.approx(0.9)
    # Three run: a concurrency limit of 4 (and no rate) lets one more start, not two.
    assert gate.try_acquire("crm", Limits(max_concurrency=4), 0.3) == 0.0
    assert gate.try_acquire("crm", Limits(max_concurrency=4), 0.3) == math.inf


def test_a_raised_limit_lets_the_line_start_at_the_next_wakeup() -> None:
    gate: LimitGate[str] = LimitGate()
    assert gate.try_acquire("crm", Limits(max_concurrency=1), 0.0) == 0.0
    assert gate.try_acquire("crm", Limits(max_concurrency=1), 0.0) == math.inf
    gate.park("crm", "second")
    assert gate.try_acquire("crm", Limits(max_concurrency=3), 0.0) == math.inf  # behind it
    gate.park("crm", "third")
    assert gate.next_wakeup() == -math.inf  # now
    assert gate.unpark_due(0.0) == ["second", "third"]


def test_a_rate_prints_as_count_per_seconds() -> None:
    assert str(parse_rate("10/2s")) == "10/2s"
    assert str(parse_rate("5/min")) == "5/60s"


def test_misuse_is_reported() -> None:
    gate: LimitGate[int] = LimitGate()
    with pytest.raises(RuntimeError, match=r"release\('crm'\) without a matching try_acquire"):
        gate.release("crm")
    with pytest.raises(RuntimeError, match=r"park\('crm'\) before any try_acquire"):
        gate.park("crm", 1)


def test_a_withdrawn_item_leaves_its_line_holding_nothing() -> None:
    gate: LimitGate[str] = LimitGate()
    limits = Limits(max_concurrency=1)
    assert gate.try_acquire("crm", limits, 0.0) == 0.0
    for item in ("second", "third"):
        assert gate.try_acquire("crm", limits, 0.0) == math.inf
        gate.park("crm", item)
    gate.withdraw("crm", "second")
    assert (gate.parked, gate.running("crm")) == (1, 1)
    gate.release("crm")
    assert gate.unpark_ready("crm", 0.0) == ["third"]
    assert gate.try_acquire("crm", limits, 0.0) == math.inf
    gate.park("crm", "fourth")
    gate.withdraw("crm", "fourth")  # the last of its line: the line is gone
    assert (gate.parked, gate.next_wakeup(), gate.running("crm")) == (0, None, 1)
    with pytest.raises(ValueError, match=r"withdraw\('crm', ...\) of an item that does not wait"):
        gate.withdraw("crm", "fourth")


def test_take_parked_empties_every_line() -> None:
    gate: LimitGate[str] = LimitGate()
    for name in ("a", "b"):
        gate.try_acquire(name, Limits(max_concurrency=1), 0.0)
        gate.try_acquire(name, Limits(max_concurrency=1), 0.0)
        gate.park(name, f"{name}1")
        gate.park(name, f"{name}2")
    assert gate.take_parked() == ["a1", "a2", "b1", "b2"]
    assert (gate.parked, gate.next_wakeup(), gate.unpark_due(99.0)) == (0, None, [])


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["add", "end", "tick"]),
            st.sampled_from(["a", "b"]),
            st.floats(min_value=0.0, max_value=0.7),
        ),
        max_size=150,
    ),
    max_concurrency=st.one_of(st.none(), st.integers(1, 3)),
    count=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_any_schedule_keeps_every_limit_and_the_fifo_order(
    ops: list[tuple[str, str, float]], max_concurrency: int | None, count: int, seed: int
) -> None:
    limits = Limits(max_concurrency, Rate(count, 1.0))
    gate: LimitGate[tuple[str, int]] = LimitGate()
    pick = random.Random(seed)
    now = 0.0
    running: dict[str, list[int]] = defaultdict(list)
    started: dict[str, list[tuple[int, float]]] = defaultdict(list)
    added = 0

    def start(item: tuple[str, int]) -> None:
        name, number = item
        running[name].append(number)
        started[name].append((number, now))
        assert max_concurrency is None or len(running[name]) <= max_concurrency

    for op, name, step in ops:
        if op == "add":
            added += 1
            if gate.try_acquire(name, limits, now) == 0.0:
                start((name, added))
            else:
                gate.park(name, (name, added))
        elif op == "end" and running[name]:
            running[name].pop(pick.randrange(len(running[name])))
            gate.release(name)
            for item in gate.unpark_ready(name, now):
                start(item)
        else:
            now += step
            wake = gate.next_wakeup()
            if wake is not None and wake <= now:
                for item in gate.unpark_due(now):
                    start(item)
    for name, starts in started.items():
        numbers = [number for number, _ in starts]
        assert numbers == sorted(numbers), f"a later task of {name} overtook an earlier one"
        times = [at for _, at in starts]
        for first, last in zip(times, times[count:], strict=False):
            assert last >= first + 1.0, f"more than {count} starts of {name} within 1 s"
    assert gate.parked == added - sum(len(starts) for starts in started.values())
    # Whatever waits starts once the running end and time passes: no item is forgotten.
    for _ in range(added + 1):
        for name, numbers in running.items():
            for _ in list(numbers):
                numbers.pop()
                gate.release(name)
                for item in gate.unpark_ready(name, now):
                    start(item)
        now += 1.0
        for item in gate.unpark_due(now):
            start(item)
    assert gate.parked == 0
    assert sum(len(starts) for starts in started.values()) == added


# -- the gate driving real asyncio tasks ----------------------------------------------------


@dataclass
class Downstream:
    """A third party that counts its concurrent calls and when each call arrived."""

    concurrent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    most_concurrent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    arrivals: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: defaultdict(list))
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def call(self, name: str, number: int, hold: asyncio.Event | float) -> None:
        self.arrivals[name].append((number, asyncio.get_running_loop().time()))
        async with self.arrived:
            self.arrived.notify_all()
        self.concurrent[name] += 1
        self.most_concurrent[name] = max(self.most_concurrent[name], self.concurrent[name])
        try:
            if isinstance(hold, asyncio.Event):
                await hold.wait()
            else:
                await asyncio.sleep(hold)
        finally:
            self.concurrent[name] -= 1


Item = tuple[str, "Limits | None", int, "asyncio.Event | float"]


class Dispatcher:
    """What the executor does with the gate, in miniature: start, park, wake on release/timer."""

    def __init__(self, downstream: Downstream) -> None:
        self.loop = asyncio.get_running_loop()
        self.gate: LimitGate[Item] = LimitGate()
        self.downstream = downstream
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.idle = asyncio.Event()

    def submit(
        self, name: str, limits: Limits | None, number: int, hold: asyncio.Event | float
    ) -> None:
        item: Item = (name, limits, number, hold)
        if limits is None or self.gate.try_acquire(name, limits, self.loop.time()) == 0.0:
            self._start(item)
        else:
            self.gate.park(name, item)
            self._arm()

    def _start(self, item: Item) -> None:
        self.idle.clear()
        task = self.loop.create_task(self._run(item))
        self.tasks.add(task)

    async def _run(self, item: Item) -> None:
        name, limits, number, hold = item
        try:
            await self.downstream.call(name, number, hold)
        finally:
            self.tasks.discard(asyncio.current_task())  # type: ignore[arg-type,unused-ignore]
            if limits is not None:
                self.gate.release(name)
                for ready in self.gate.unpark_ready(name, self.loop.time()):
                    self._start(ready)
                self._arm()
            if not self.tasks and self.gate.parked == 0:
                self.idle.set()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        wake = self.gate.next_wakeup()
        if wake is not None:
            self.timer = self.loop.call_at(wake, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        for ready in self.gate.unpark_due(self.loop.time()):
            self._start(ready)
        self._arm()


@pytest.mark.anyio
async def test_concurrency_never_exceeds_the_limit_under_many_tasks() -> None:
    downstream = Downstream()
    dispatcher = Dispatcher(downstream)
    pick = random.Random(7)
    limits = Limits(max_concurrency=5)
    for number in range(300):
        dispatcher.submit("crm", limits, number, pick.uniform(0.0, 0.004))
    with anyio.fail_after(10):
        await dispatcher.idle.wait()
    assert downstream.most_concurrent["crm"] == 5
    numbers = [number for number, _ in downstream.arrivals["crm"]]
    assert numbers == list(range(300))


@pytest.mark.anyio
async def test_rate_is_never_exceeded_in_any_window() -> None:
    downstream = Downstream()
    dispatcher = Dispatcher(downstream)
    limits = Limits(rate=parse_rate("4/200ms"))
    for number in range(14):
        dispatcher.submit("sms", limits, number, 0.0)
    with anyio.fail_after(10):
        await dispatcher.idle.wait()
    arrivals = [at for _, at in downstream.arrivals["sms"]]
    assert len(arrivals) == 14
    # The first four at once (the burst), then never a fifth within 0.2 s of four others. The
    # calls arrive a task step after the gate let them start: allow that much, not a window.
    assert arrivals[3] - arrivals[0] < 0.05
    for first, fifth in zip(arrivals, arrivals[4:], strict=False):
        assert fifth - first >= 0.2 - 0.01
    assert arrivals[-1] - arrivals[0] >= 0.6  # three windows after the burst, not fewer


@pytest.mark.anyio
async def test_a_limited_name_never_blocks_the_others() -> None:
    downstream = Downstream()
    dispatcher = Dispatcher(downstream)
    stuck = asyncio.Event()
    for number in range(3):
        dispatcher.submit("crm", Limits(max_concurrency=1), number, stuck)
    for number in range(20):
        dispatcher.submit("email", None, number, 0.0)
        dispatcher.submit("sms", Limits(max_concurrency=2, rate=Rate(100, 1.0)), number, 0.0)
    with anyio.fail_after(5):
        async with downstream.arrived:
            await downstream.arrived.wait_for(
                lambda: len(downstream.arrivals["email"]) + len(downstream.arrivals["sms"]) == 40
            )
    assert downstream.most_concurrent["sms"] == 2
    assert (len(downstream.arrivals["crm"]), dispatcher.gate.parked) == (1, 2)
    stuck.set()
    with anyio.fail_after(5):
        await dispatcher.idle.wait()
    assert [number for number, _ in downstream.arrivals["crm"]] == [0, 1, 2]
    assert downstream.most_concurrent["crm"] == 1
