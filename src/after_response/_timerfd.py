"""A one-shot kernel timer (Linux ``timerfd``) for the loop watchdog's thread to sleep on.

The heartbeat pushes the timer forward at every beat, so a thread blocked reading it wakes
only when the loop misses a beat. A thread that woke on a clock instead would, on a busy
loop, wait for the GIL, and every ``select`` of the loop releases the GIL and wakes it to
lose the race again: a few percent of a fast server's throughput, for a thread that has
nothing to do while the loop is healthy.

The calls go through ``ctypes`` (which releases the GIL around them) on every Python, so
3.10 to 3.12 have the timer too (3.13 added ``os.timerfd_create``). Elsewhere, or if
anything is missing, there is no timer and the watchdog's thread wakes once a beat instead.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

_CLOCK_MONOTONIC = 1  # the clock of time.monotonic() on Linux


class _TimeSpec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _ITimerSpec(ctypes.Structure):
    _fields_ = (("it_interval", _TimeSpec), ("it_value", _TimeSpec))


class TimerFd:
    """A one-shot timer: :meth:`arm` it (from any thread), :meth:`wait` for it to fire."""

    def __init__(self, fd: int, settime: Any) -> None:
        self._fd = fd
        self._settime = settime

    def arm(self, seconds: float) -> None:
        """Fire in ``seconds`` (> 0), replacing any earlier setting and unread expiry."""
        whole = int(seconds)
        spec = _ITimerSpec()
        spec.it_value.tv_sec = whole
        spec.it_value.tv_nsec = max(1, int((seconds - whole) * 1e9))
        if self._settime(self._fd, 0, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def wait(self) -> None:
        """Block, without the GIL, until the timer fires."""
        os.read(self._fd, 8)

    def close(self) -> None:
        os.close(self._fd)


def timer_fd() -> TimerFd | None:
    """A new timer, or ``None`` where the platform has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes = (ctypes.c_int, ctypes.c_int)
    create.restype = ctypes.c_int
    settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.POINTER(_ITimerSpec), ctypes.c_void_p)
    settime.restype = ctypes.c_int
    fd = create(_CLOCK_MONOTONIC, os.O_CLOEXEC)
    return None if fd < 0 else TimerFd(fd, settime)
