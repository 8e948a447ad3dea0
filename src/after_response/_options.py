"""Per-task options: names, timeouts and retry policies, and how the levels combine."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, NamedTuple, TypeVar

from ._checks import check_int, check_number, check_seconds
from ._limits import Limits, Rate, parse_rate

T = TypeVar("T")

OPTIONS_ATTRIBUTE: Final = "__after_response_options__"


def limits_from_options(
    max_concurrency: int | None = None, rate_limit: str | Rate | None = None
) -> Limits | None:
    """The :class:`Limits` of a task's options, or ``None`` when it has none (the free path).

    Raises:
        ValueError, TypeError: as :class:`Limits` and :func:`parse_rate` do.
    """
    rate = rate_limit if isinstance(rate_limit, Rate) else parse_rate(rate_limit)
    if max_concurrency is None and rate is None:
        return None
    return Limits(max_concurrency, rate)


class _Unset:
    """Marks an option the caller did not give, so that ``None`` can mean "no timeout"."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


@dataclass(frozen=True)
class Retry:
    """How a failing task is tried again.

    The delay before attempt ``n + 1`` is ``backoff * multiplier ** (n - 1)``, capped at
    ``max_backoff``, then reduced by a random fraction of at most ``jitter`` (1.0 is "full
    jitter": anywhere between zero and the delay). Only exceptions that are instances of
    ``retry_on`` are retried; a timed-out attempt raises :class:`TaskTimeoutError`, a
    subclass of ``TimeoutError`` and so of ``Exception``.

    Args:
        attempts: how many times the task runs at most, the first run included.
        backoff: the delay in seconds before the second attempt.
        multiplier: how much the delay grows after each attempt.
        max_backoff: the longest delay in seconds.
        jitter: the fraction of each delay that is randomised, from 0.0 to 1.0.
        retry_on: the exception types that are worth another attempt: one type, or a tuple
            of them (a list or a set is turned into a tuple).

    Raises:
        TypeError: when a number is not one (a string, or a float for ``attempts``), or
            ``retry_on`` holds something other than exception types.
        ValueError: when a number is out of its range, or ``retry_on`` is empty.
    """

    attempts: int = 3
    backoff: float = 0.5
    multiplier: float = 2.0
    max_backoff: float = 30.0
    jitter: float = 1.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if check_int("Retry(attempts=...)", self.attempts, "an int") < 1:
            raise ValueError(
                f"Retry(attempts={self.attempts}) must be at least 1 (1 means no retry)"
            )
        for attribute in ("backoff", "max_backoff"):
            value = check_number(
                f"Retry({attribute}=...)", getattr(self, attribute), "a finite number >= 0 seconds"
            )
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"Retry({attribute}={value!r}) must be a finite number >= 0 seconds"
                )
        multiplier = check_number("Retry(multiplier=...)", self.multiplier, "a number >= 1")
        if not math.isfinite(multiplier) or multiplier < 1:
            raise ValueError(f"Retry(multiplier={multiplier!r}) must be a number >= 1")
        jitter = check_number("Retry(jitter=...)", self.jitter, "a number between 0.0 and 1.0")
        if not 0 <= jitter <= 1:
            raise ValueError(f"Retry(jitter={jitter!r}) must be between 0.0 and 1.0")
        object.__setattr__(self, "retry_on", _exception_types(self.retry_on))

    def delay(self, attempt: int) -> float:
        """The seconds to wait after failed attempt number ``attempt`` (1-based)."""
        delay = min(self.max_backoff, self.backoff * self.multiplier ** (attempt - 1))
        return delay * (1.0 - self.jitter * random.random())

    def should_retry(self, attempt: int, exc: BaseException) -> bool:
        """Whether a task whose attempt number ``attempt`` raised ``exc`` runs again."""
        return attempt < self.attempts and isinstance(exc, self.retry_on)


def _exception_types(retry_on: object) -> tuple[type[BaseException], ...]:
    """``retry_on`` as the tuple ``isinstance`` takes, or a clear error."""
    if isinstance(retry_on, type):
        retry_on = (retry_on,)
    if isinstance(retry_on, (str, bytes)) or not isinstance(retry_on, Iterable):
        raise TypeError(_not_exception_types(type(retry_on).__name__))
    types = tuple(retry_on)
    for item in types:
        if not isinstance(item, type):
            raise TypeError(_not_exception_types(f"{type(item).__name__} among them"))
        if not issubclass(item, BaseException):
            raise TypeError(_not_exception_types(f"the class {item.__name__} among them"))
    if not types:
        raise ValueError(
            "Retry(retry_on=...) is empty, so no exception would be retried: for no retry, "
            "write retry=None or Retry(attempts=1); to retry every exception, leave retry_on out"
        )
    return types


def _not_exception_types(got: str) -> str:
    return (
        f"Retry(retry_on=...) must be an exception type or a tuple of exception types, got "
        f"{got}; for example retry_on=(ConnectionError, TimeoutError)"
    )


NO_RETRY: Final = Retry(attempts=1)


@dataclass(frozen=True)
class TaskOptions:
    """Options given for a task; fields left ``UNSET`` fall back to the next level.

    The levels, most specific first: ``collector.options(...)``, the ``@side_effect``
    decorator, then the middleware's defaults.
    """

    name: str | _Unset = UNSET
    timeout: float | _Unset | None = UNSET
    retry: Retry | _Unset | None = UNSET
    run_on_error: bool | _Unset = UNSET
    durable: bool | _Unset = UNSET
    key: str | _Unset | None = UNSET
    max_concurrency: int | _Unset | None = UNSET
    rate_limit: str | _Unset | None = UNSET
    #: ``max_concurrency`` and ``rate_limit``, parsed.
    limits: Limits | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.name, _Unset) and (not isinstance(self.name, str) or not self.name):
            raise TypeError(f"name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.timeout, _Unset):
            check_seconds("timeout", self.timeout)
        if not isinstance(self.retry, (_Unset, Retry)) and self.retry is not None:
            raise TypeError(
                f"retry must be a Retry(...) or None, got {self.retry!r}; "
                "for example retry=Retry(attempts=3, backoff=0.5)"
            )
        if not isinstance(self.run_on_error, (_Unset, bool)):
            raise TypeError(f"run_on_error must be True or False, got {self.run_on_error!r}")
        if not isinstance(self.durable, (_Unset, bool)):
            raise TypeError(f"durable must be True or False, got {self.durable!r}")
        if not isinstance(self.key, (_Unset, str)) and self.key is not None:
            raise TypeError(
                f"key must be a string or None, got {type(self.key).__name__}; for example "
                'key=f"order-{order.id}-receipt"'
            )
        if isinstance(self.key, str) and not self.key:
            raise ValueError('key must not be empty; for example key=f"order-{order.id}-receipt"')
        # Parsed once here (this checks both, with their own messages), not at every add().
        limits = limits_from_options(
            _pick(self.max_concurrency, None), _pick(self.rate_limit, None)
        )
        object.__setattr__(self, "limits", limits)

    def over(self, fallback: TaskOptions) -> TaskOptions:
        """These options, with every unset field taken from ``fallback``."""
        return TaskOptions(
            name=_pick(self.name, fallback.name),
            timeout=_pick(self.timeout, fallback.timeout),
            retry=_pick(self.retry, fallback.retry),
            run_on_error=_pick(self.run_on_error, fallback.run_on_error),
            durable=_pick(self.durable, fallback.durable),
            key=_pick(self.key, fallback.key),
            max_concurrency=_pick(self.max_concurrency, fallback.max_concurrency),
            rate_limit=_pick(self.rate_limit, fallback.rate_limit),
        )

    def resolve(self, defaults: Resolved, default_name: str) -> Resolved:
        """Concrete options: each unset field from the middleware's ``defaults``."""
        return Resolved(
            _pick(self.name, default_name),
            _pick(self.timeout, defaults.timeout),
            _pick(self.retry, defaults.retry) or NO_RETRY,
            _pick(self.run_on_error, defaults.run_on_error),
            _pick(self.durable, defaults.durable),
            _pick(self.key, defaults.key),
            self.limits,
        )


class Resolved(NamedTuple):
    """The options a task runs with, every level applied."""

    name: str
    timeout: float | None
    retry: Retry
    run_on_error: bool
    durable: bool = False
    key: str | None = None
    limits: Limits | None = None


def _pick(value: T | _Unset, fallback: T) -> T:
    return fallback if isinstance(value, _Unset) else value


EMPTY_OPTIONS: Final = TaskOptions()
