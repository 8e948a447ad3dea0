"""The library's own exceptions: raised to users and handed to the dead-letter hook.

Every one derives from :class:`AfterResponseError` and keeps the builtin base a caller
would catch without knowing this library (``LookupError``, ``TimeoutError``, ...).
"""

from __future__ import annotations


class AfterResponseError(Exception):
    """Base class of every exception after-response defines."""


class NoActiveRequestError(AfterResponseError, LookupError):
    """``current()`` was called where no request handled by the middleware is active."""


class NoCurrentTaskError(AfterResponseError, LookupError):
    """``current_task()`` was called outside a running side effect."""


class TaskTimeoutError(AfterResponseError, TimeoutError):
    """A task's attempt ran longer than its timeout and was cancelled."""


class TaskShedError(AfterResponseError, RuntimeError):
    """A task was dropped because it found no room: the queue, and the room to wait for it,
    were full (see ``max_pending`` and ``overflow_timeout``)."""


class TaskAbandonedError(AfterResponseError, RuntimeError):
    """A task was cancelled, or never started, because shutdown's drain deadline passed or
    the request call that owned it (without lifespan) was cancelled."""


class TaskProcessDiedError(AfterResponseError, RuntimeError):
    """A durable task was not run again: its process died too often while it ran (a side
    effect that crashes its process: a segfault, the OOM killer). Its dead letter is stored
    with the error type ``ProcessDied``."""


class EngineConfigurationError(AfterResponseError, RuntimeError):
    """An engine's settings would make the hand-off unsafe (lose or never redeliver a
    side effect): raised at lifespan startup, so the server does not start with them."""


class StoreUnavailableError(AfterResponseError, RuntimeError):
    """A durable side effect could not be stored, so the response was not completed."""
