"""A watchdog for side effects that hold the event loop: an ``async def`` calling ``time.sleep``.

How it sees a block, at no cost per task:

- A *heartbeat* callback on the loop reschedules itself every ``threshold / 2`` seconds
  (``loop.call_later``) and notes when the next beat is due.
- ONE daemon thread per watchdog sleeps until the beat is ``threshold / 4`` late: on Linux on
  a kernel timer (``_timerfd``) that every beat pushes forward, so a healthy loop never wakes
  it; elsewhere on a clock, once a beat. While the beat is overdue, it wakes every
  ``threshold / 4`` seconds, samples the loop thread's stack (``sys._current_frames()``) and
  walks ``f_back`` from the innermost frame to the first frame of a registered *runner* (the
  coroutine function that awaits each side effect). While a coroutine runs, its frame's
  ``f_back`` chain goes through every coroutine awaiting it, so the runner's frame is on it.
  ``describe(frame)`` turns that frame into a description of the task (it reads the frame's
  locals), in this thread, while the frame is live.
- When the loop is free again it runs the beat, which measures how late it ran: later than
  ``threshold``, it calls ``on_block(description, blocked_for)`` on the loop's thread, once per
  blocking episode.

``description`` is what ``describe`` returned when every *confirmed* sample of the episode found
the same runner frame (a sample is confirmed when the thread's next wake-up finds the beat still
not run: the loop was held from the sample on). It is ``None`` when the loop was held by
something else: code outside any runner (a request handler, a C call that kept the GIL), or
many short steps of different tasks in one loop iteration, which no single side effect is to
blame for. ``blocked_for`` is how late the beat ran: a lower bound of the time the loop was held,
short by at most one beat period (``threshold / 2``). So a block longer than ``1.5 * threshold``
is always reported, and no block shorter than ``threshold`` ever is.

The runner must await the side effect in its own frame, in the same task (``await fn(...)``, or
under a cancel scope), so that the side effect's frames chain up to it; a side effect moved to
a task of its own (``asyncio.wait_for`` before 3.12 does that) is reported as ``None``.

Costs when on: ``2 / threshold`` beats a second on the loop (20 at 0.1 s), each re-arming the
timer; no thread wake-up while the loop is healthy (without a timer: one a beat); stacks are
walked only while the loop is held. ``threshold=None`` turns it all off: no thread, no beat.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, Final, Generic, TypeVar

from ._checks import check_seconds
from ._timerfd import TimerFd, timer_fd

T = TypeVar("T")

DEFAULT_THRESHOLD: Final = 0.1
"""Seconds a side effect may hold the loop before it is reported."""

logger = logging.getLogger("after_response")


class _Sample(Generic[T]):
    """A runner frame seen on the loop thread's stack, and its task's description."""

    __slots__ = ("description", "frame")

    def __init__(self, frame: FrameType | None, description: T | None) -> None:
        self.frame = frame
        self.description = description


_NO_SINGLE_RUNNER: Final[_Sample[Any]] = _Sample(None, None)
"""No runner frame was seen, or different ones were: no single side effect to name."""


class Watchdog(Generic[T]):
    """Reports the side effects that hold the event loop longer than ``threshold`` seconds.

    Args:
        threshold: seconds the loop may be held before it is reported; ``None`` turns the
            watchdog off (``start`` then starts nothing).
        on_block: called as ``on_block(description, blocked_for)`` on the loop's thread once the
            loop is free again, once per blocking episode. ``description`` is what a runner's
            ``describe`` returned, or ``None`` when no single side effect held the loop.

    Raises:
        TypeError: when ``threshold`` is neither ``None`` nor a number.
        ValueError: when it is a number that is not a positive number of seconds.
    """

    def __init__(
        self, threshold: float | None, on_block: Callable[[T | None, float], None]
    ) -> None:
        check_seconds("the loop-blocking threshold (None turns the watchdog off)", threshold)
        self._threshold = threshold
        self._on_block = on_block
        self._runners: dict[CodeType, Callable[[FrameType], T | None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._thread: threading.Thread | None = None
        # One per start, set by stop: a beat or thread left over from an earlier start sees
        # its own event set and ends, whatever a later start does.
        self._stopping = threading.Event()
        self._handle: asyncio.TimerHandle | None = None
        self._alarm: TimerFd | None = None
        #: Times the thread woke up (to look at the beat, or to sample the loop's stack).
        self.wakeups = 0
        # Shared with the thread; each is replaced whole, never changed in place.
        self._beat_state: tuple[int, float] = (0, math.inf)  # (beats so far, next beat due)
        self._finding: tuple[int, T | None] | None = None  # (episode's beat count, description)

    @property
    def threshold(self) -> float | None:
        """Seconds the loop may be held before it is reported; ``None``: the watchdog is off."""
        return self._threshold

    @property
    def beats(self) -> int:
        """Heartbeats run since the last start."""
        return self._beat_state[0]

    @property
    def running(self) -> bool:
        """Whether the watchdog is started (and not turned off)."""
        return self._thread is not None

    def register_runner(self, code: CodeType, describe: Callable[[FrameType], T | None]) -> None:
        """Declare ``code`` (a coroutine function's ``__code__``) as the runner of side effects.

        ``describe(frame)`` receives a live frame of that code, on the watchdog's thread, and
        returns what names its task (for example ``frame.f_locals.get("job")``), or ``None``.
        It must be quick and must not raise; an exception is logged and taken as ``None``.
        """
        self._runners = {**self._runners, code: describe}

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start watching ``loop`` (by default the running one); call it on the loop's thread.

        Raises:
            RuntimeError: when ``loop`` is not running in this thread, or when already started.
        """
        threshold = self._threshold
        if threshold is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is None or (loop is not None and loop is not running):
            raise RuntimeError(
                "Watchdog.start() must be called on the thread that runs the loop it watches,"
                " from a coroutine or callback of that loop (for example in lifespan startup)"
            )
        if self._thread is not None:
            raise RuntimeError("this watchdog is already started; stop() it first")
        self._loop = running
        self._loop_thread = threading.get_ident()
        self._stopping = stopping = threading.Event()
        self._finding = None
        period = threshold / 2
        self._handle = running.call_later(period, self._beat, stopping)
        self._beat_state = (0, time.monotonic() + period)
        self._alarm = alarm = timer_fd()
        if alarm is not None:
            alarm.arm(period + threshold / 4)
        self._thread = threading.Thread(
            target=self._watch,
            args=(threshold, stopping, alarm),
            name="after-response-watchdog",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the beat and the thread, and wait (briefly) for the thread to end."""
        thread, loop, handle = self._thread, self._loop, self._handle
        if thread is None:
            return
        self._thread = self._handle = None
        self._stopping.set()
        alarm, self._alarm = self._alarm, None
        if alarm is not None:
            alarm.arm(1e-9)  # wake the thread now
        if handle is not None and loop is not None:
            if threading.get_ident() == self._loop_thread:
                handle.cancel()
            elif not loop.is_closed():
                loop.call_soon_threadsafe(handle.cancel)
        thread.join(timeout=5.0)
        if alarm is not None and not thread.is_alive():
            alarm.close()

    # -- on the loop -----------------------------------------------------------------------

    def _beat(self, stopping: threading.Event) -> None:
        threshold, loop = self._threshold, self._loop
        if stopping.is_set() or threshold is None or loop is None:
            return
        now = time.monotonic()
        beats, due = self._beat_state
        period = threshold / 2
        self._handle = loop.call_later(period, self._beat, stopping)
        self._beat_state = (beats + 1, now + period)
        alarm = self._alarm
        if alarm is not None:
            alarm.arm(period + threshold / 4)  # fires if the next beat is a tick late
        late = now - due
        if late <= threshold:
            return
        finding = self._finding
        description = finding[1] if finding is not None and finding[0] == beats else None
        self._finding = None
        try:
            self._on_block(description, late)
        except Exception:
            logger.exception("after-response: the loop-blocking watchdog's on_block raised")

    # -- on the watchdog's thread ----------------------------------------------------------

    def _watch(self, threshold: float, stopping: threading.Event, alarm: TimerFd | None) -> None:
        tick = threshold / 4
        episode = -1  # the beat count of the episode being sampled, -1 between episodes
        confirmed: _Sample[T] | None = None  # what every confirmed sample agrees on
        pending: _Sample[T] | None = None  # the last sample, confirmed if the episode goes on
        pause = tick
        on_alarm = alarm is not None
        while True:
            if on_alarm:
                assert alarm is not None
                alarm.wait()
                if stopping.is_set():
                    return
            elif stopping.wait(pause):
                return
            self.wakeups += 1
            beats, due = self._beat_state
            overdue = time.monotonic() - due
            if overdue <= tick:
                # Not held (or no longer): drop the frames, which hold their tasks' locals.
                episode, confirmed, pending = -1, None, None
                # Sleep until this beat would be a tick late. A beat not due yet re-arms the
                # alarm when it runs; one already due might be held up now: poll for it.
                pause = tick - overdue
                on_alarm = alarm is not None and overdue <= 0
                continue
            on_alarm = False
            pause = tick
            if beats != episode:
                episode, confirmed, pending = beats, None, None
            elif pending is not None:
                if confirmed is None:
                    confirmed = pending
                elif confirmed.frame is not pending.frame:
                    confirmed = _NO_SINGLE_RUNNER
                self._finding = (episode, confirmed.description)
            frame = self._runner_frame()
            if frame is None:
                pending = _NO_SINGLE_RUNNER
            elif pending is None or pending.frame is not frame:
                pending = _Sample(frame, self._describe(frame))
            del frame

    def _runner_frame(self) -> FrameType | None:
        runners = self._runners
        frame = sys._current_frames().get(self._loop_thread)
        while frame is not None and frame.f_code not in runners:
            frame = frame.f_back
        return frame

    def _describe(self, frame: FrameType) -> T | None:
        try:
            return self._runners[frame.f_code](frame)
        except Exception as error:
            logger.warning(
                "after-response: the loop-blocking watchdog's describe() raised %s",
                type(error).__qualname__,
            )
            return None
