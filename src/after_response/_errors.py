"""Exceptions raised to users and handed to the dead-letter hook."""

from __future__ import annotations


class NoActiveRequestError(LookupError):
    """``current()`` was called where no request handled by the middleware is active."""


class TaskTimeoutError(TimeoutError):
    """A task's attempt ran longer than its timeout and was cancelled."""


class TaskShedError(RuntimeError):
    """A task was dropped because the pending queue stayed full past ``overflow_timeout``."""


class TaskAbandonedError(RuntimeError):
    """A task was cancelled, or never started, because shutdown's drain deadline passed."""
