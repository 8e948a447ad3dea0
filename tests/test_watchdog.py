"""The loop-blocking watchdog, on a real asyncio loop with side effects that call time.sleep."""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import FrameType

import anyio
import pytest

from after_response import _watchdog
from after_response._timerfd import timer_fd
from after_response._watchdog import DEFAULT_THRESHOLD, Watchdog

from .durable_process import until

SideEffect = Callable[[], Awaitable[None]]


async def run_side_effect(task: str, side_effect: SideEffect) -> None:
    """The runner: what the executor's coroutine that awaits each side effect stands for."""
    await side_effect()


def describe(frame: FrameType) -> str | None:
    task = frame.f_locals.get("task")
    return task if isinstance(task, str) else None


class Reports:
    """The watchdog's reports, with a way to wait for the next one."""

    def __init__(self) -> None:
        self.reports: list[tuple[str | None, float]] = []
        self._read = 0
        self._arrived = asyncio.Event()

    def __call__(self, description: str | None, blocked_for: float) -> None:
        self.reports.append((description, blocked_for))
        self._arrived.set()

    async def next(self) -> tuple[str | None, float]:
        """The first report not read yet, once it has arrived."""
        with anyio.fail_after(5):
            while len(self.reports) == self._read:
                self._arrived.clear()
                await self._arrived.wait()
        self._read += 1
        return self.reports[self._read - 1]

    def named(self) -> list[tuple[str, float]]:
        return [(name, blocked) for name, blocked in self.reports if name is not None]


@pytest.fixture(params=["kernel timer", "clock"])
def sleeping_on(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """What the watchdog's thread sleeps on: Linux's timer, or the clock (elsewhere)."""
    if request.param == "clock":
        monkeypatch.setattr(_watchdog, "timer_fd", lambda: None)
    elif timer_fd() is None:
        pytest.skip("no kernel timer on this platform")
    return str(request.param)


@pytest.fixture
async def watched(sleeping_on: str) -> AsyncIterator[tuple[Watchdog[str], Reports]]:
    reports = Reports()
    watchdog: Watchdog[str] = Watchdog(0.1, reports)
    watchdog.register_runner(run_side_effect.__code__, describe)
    watchdog.start()
    yield watchdog, reports
    watchdog.stop()


async def blocking() -> None:
    await deeper_blocking()


async def deeper_blocking() -> None:
    time.sleep(0.3)  # the block under test  # noqa: ASYNC251


def watchdog_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "after-response-watchdog"]


@pytest.mark.anyio
async def test_a_side_effect_that_blocks_is_reported_once_by_name(
    watched: tuple[Watchdog[str], Reports],
) -> None:
    _, reports = watched
    await run_side_effect("send_email#1", blocking)
    description, blocked_for = await reports.next()
    assert description == "send_email#1"
    assert blocked_for >= 0.25
    # A later block, reported too, shows that nothing else was reported in between.
    await run_side_effect("sync_crm#2", blocking)
    await reports.next()
    assert [name for name, _ in reports.named()] == ["send_email#1", "sync_crm#2"]


@pytest.mark.anyio
async def test_a_healthy_loop_wakes_the_thread_at_most_once_a_beat(
    sleeping_on: str, watched: tuple[Watchdog[str], Reports]
) -> None:
    # A thread waking on a busy loop costs the loop: it waits for the GIL, and each select
    # wakes it again. On the kernel timer it never wakes while the beats come on time.
    watchdog, reports = watched
    await until(lambda: watchdog.beats >= 6, 5, "six heartbeats")
    assert reports.reports == []
    if sleeping_on == "kernel timer":
        # None while every beat is on time; one if a loaded machine made a beat a tick late.
        assert watchdog.wakeups <= 1
    else:
        assert 0 < watchdog.wakeups <= watchdog.beats + 1


def test_the_kernel_timer_is_linux_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.platform", "darwin")
    assert timer_fd() is None


def test_without_a_usable_libc_there_is_no_kernel_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(*args: object, **kwargs: object) -> None:
        raise OSError("no C library here")

    monkeypatch.setattr("after_response._timerfd.ctypes.CDLL", no_libc)
    assert timer_fd() is None


def test_a_kernel_timer_the_kernel_refuses_to_arm_raises() -> None:
    timer = timer_fd()
    if timer is None:
        pytest.skip("no kernel timer on this platform")
    try:
        timer.arm(0.001)
        timer.wait()  # it fires
        # A negative time, which the kernel refuses (EINVAL); not a closed fd, whose number
        # another thread could open again in between.
        with pytest.raises(OSError, match="timerfd_settime failed") as refused:
            timer.arm(-1.5)
        assert refused.value.errno == errno.EINVAL
    finally:
        timer.close()


@pytest.mark.anyio
async def test_on_block_runs_on_the_loop_thread_once_the_loop_is_free() -> None:
    threads: list[int] = []
    done = asyncio.Event()

    def on_block(description: str | None, blocked_for: float) -> None:
        threads.append(threading.get_ident())
        done.set()

    watchdog: Watchdog[str] = Watchdog(0.1, on_block)
    watchdog.start()
    try:
        await blocking()
        with anyio.fail_after(5):
            await done.wait()
    finally:
        watchdog.stop()
    assert threads[0] == threading.get_ident()


@pytest.mark.anyio
async def test_short_steps_are_never_reported(watched: tuple[Watchdog[str], Reports]) -> None:
    _, reports = watched

    async def busy_but_polite() -> None:
        for _ in range(40):
            time.sleep(0.005)  # short blocking steps  # noqa: ASYNC251
            await asyncio.sleep(0)
        for _ in range(10):
            await asyncio.sleep(0.01)

    await asyncio.gather(*(run_side_effect(f"polite#{n}", busy_but_polite) for n in range(3)))
    await run_side_effect("rude#1", blocking)
    # A loaded machine may hold the whole loop for a while (a None report); never a
    # polite side effect by name.
    while (await reports.next())[0] != "rude#1":
        pass
    assert [name for name, _ in reports.named()] == ["rude#1"]


@pytest.mark.anyio
async def test_a_block_outside_any_side_effect_reports_none(
    watched: tuple[Watchdog[str], Reports],
) -> None:
    _, reports = watched
    time.sleep(0.3)  # a request handler blocking, not a side effect  # noqa: ASYNC251
    description, blocked_for = await reports.next()
    assert (description, blocked_for >= 0.25) == (None, True)
    assert reports.named() == []


@pytest.mark.anyio
async def test_many_short_steps_in_one_loop_iteration_name_no_single_side_effect(
    watched: tuple[Watchdog[str], Reports],
) -> None:
    _, reports = watched

    async def short_block() -> None:
        time.sleep(0.01)  # noqa: ASYNC251

    # 30 tasks made ready together run one after the other in one loop iteration.
    await asyncio.gather(*(run_side_effect(f"short#{n}", short_block) for n in range(30)))
    description, blocked_for = await reports.next()
    assert (description, blocked_for >= 0.2) == (None, True)
    assert reports.named() == []


@pytest.mark.anyio
@pytest.mark.parametrize("from_a_worker_thread", [False, True])
@pytest.mark.usefixtures("sleeping_on")
async def test_stop_ends_the_thread_and_the_beat(from_a_worker_thread: bool) -> None:
    reports = Reports()
    watchdog: Watchdog[str] = Watchdog(0.1, reports)
    watchdog.start()
    assert watchdog.running
    assert len(watchdog_threads()) == 1
    if from_a_worker_thread:
        await anyio.to_thread.run_sync(watchdog.stop)
    else:
        watchdog.stop()
    assert not watchdog.running
    assert watchdog_threads() == []
    time.sleep(0.25)  # a block that a running watchdog would report  # noqa: ASYNC251
    # A beat still scheduled would be overdue: it would run, and report, in the next turn.
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert reports.reports == []
    watchdog.stop()  # stopping twice is harmless


@pytest.mark.anyio
async def test_a_stopped_watchdog_starts_again_with_one_thread_and_one_beat() -> None:
    reports = Reports()
    watchdog: Watchdog[str] = Watchdog(0.1, reports)
    watchdog.register_runner(run_side_effect.__code__, describe)
    watchdog.start()
    await anyio.to_thread.run_sync(watchdog.stop)
    watchdog.start()
    try:
        assert len(watchdog_threads()) == 1
        await run_side_effect("send_email#1", blocking)
        assert (await reports.next())[0] == "send_email#1"
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # a second beat, if any, would have reported by now
        assert len(reports.reports) == 1
    finally:
        watchdog.stop()


@pytest.mark.anyio
async def test_a_threshold_of_none_starts_nothing() -> None:
    watchdog: Watchdog[str] = Watchdog(None, Reports())
    watchdog.register_runner(run_side_effect.__code__, describe)
    watchdog.start()
    assert not watchdog.running
    assert watchdog_threads() == []
    watchdog.stop()


@pytest.mark.anyio
async def test_a_describe_that_raises_is_logged_and_reported_as_none(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reports = Reports()
    watchdog: Watchdog[str] = Watchdog(0.1, reports)

    def broken(frame: FrameType) -> str | None:
        raise KeyError("task")

    watchdog.register_runner(run_side_effect.__code__, broken)
    watchdog.start()
    try:
        await run_side_effect("send_email#1", blocking)
        assert (await reports.next())[0] is None
    finally:
        watchdog.stop()
    assert "the loop-blocking watchdog's describe() raised KeyError" in caplog.text


@pytest.mark.anyio
async def test_an_on_block_that_raises_is_logged_and_the_watchdog_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reports = Reports()

    def on_block(description: str | None, blocked_for: float) -> None:
        reports(description, blocked_for)
        raise RuntimeError("bug in on_block")

    watchdog: Watchdog[str] = Watchdog(0.1, on_block)
    watchdog.start()
    try:
        with caplog.at_level(logging.ERROR, "after_response"):
            await blocking()
            await reports.next()
            await blocking()
            await reports.next()
    finally:
        watchdog.stop()
    assert caplog.text.count("the loop-blocking watchdog's on_block raised") >= 2


@pytest.mark.anyio
async def test_start_is_refused_off_the_loop_thread_and_twice() -> None:
    watchdog: Watchdog[str] = Watchdog(DEFAULT_THRESHOLD, Reports())
    other_loop = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError, match="on the thread that runs the loop"):
            watchdog.start(other_loop)
        with pytest.raises(RuntimeError, match="on the thread that runs the loop"):
            await anyio.to_thread.run_sync(watchdog.start)
    finally:
        other_loop.close()
    watchdog.start(asyncio.get_running_loop())
    try:
        with pytest.raises(RuntimeError, match="already started"):
            watchdog.start()
    finally:
        watchdog.stop()


@pytest.mark.parametrize(
    ("threshold", "error"),
    [
        (0, ValueError),
        (-0.1, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (True, TypeError),
        ("0.1", TypeError),
    ],
)
def test_a_bad_threshold_is_refused(threshold: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="positive number of seconds or None"):
        Watchdog(threshold, Reports())  # type: ignore[arg-type]
