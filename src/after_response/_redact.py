"""Keeping task arguments out of text: exception messages quote what a task was called with
(smtplib's ``SMTPRecipientsRefused`` holds the address), so wherever an exception's message
is written (a log line, a span event) the task's argument strings are replaced.

Only messages are redacted: a traceback's file names and source lines are code, not values,
and stay readable.
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import itertools
import sys
import traceback
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

#: Argument strings shorter than this are not redacted (they would match ordinary words and
#: line numbers; a secret is longer).
MIN_REDACTED_LENGTH: Final = 4
#: Integer arguments of fewer digits are not redacted (they would match years, ports, counts and
#: amounts; an account, card or phone number is longer).
MIN_REDACTED_DIGITS: Final = 6
#: Nor those of this many digits or more: no identifier is that long, and ``str()`` of a huge
#: int is slow (past 4,300 digits, it raises).
_MAX_REDACTED_DIGITS: Final = 100
REDACTED: Final = "[redacted]"
#: Items looked at inside each container argument, and values looked at in all, per task
#: (bounds on the work on the failure path).
_MAX_ITEMS: Final = 100
_MAX_VALUES: Final = 1000
#: How deep inside containers and data objects arguments are looked at: an argument's items
#: (a dict's keys and values, a dataclass's fields) are at depth 1, theirs at 2...
MAX_DEPTH: Final = 3

#: Bounds on a traceback's text. An exception group's are Python's own (``TracebackException``'s
#: ``max_group_width`` and ``max_group_depth``); the number of exceptions written in all is not
#: bounded by Python (groups 15 wide nest 10 deep).
MAX_GROUP_WIDTH: Final = 15
MAX_GROUP_DEPTH: Final = 10
MAX_EXCEPTIONS: Final = 50
#: Exceptions followed through ``__cause__`` and ``__context__`` from each one written.
_MAX_CHAIN: Final = 10

_CAUSE: Final = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT: Final = "\nDuring handling of the above exception, another exception occurred:\n\n"


def argument_strings(fn: object, args: Iterable[object], kwargs: Mapping[str, object]) -> list[str]:
    """The strings among a task's arguments (those bound by ``functools.partial`` too), and
    inside containers and data objects (a ``User`` dataclass, pydantic model or attrs class
    with an ``email``) down to ``MAX_DEPTH``, as they may appear in text, longest first; the
    digits of its integers of ``MIN_REDACTED_DIGITS`` digits or more; and its UUIDs, both
    ways they are written."""
    found: set[str] = set()
    values = [*args, *kwargs.values()]
    while isinstance(fn, functools.partial):
        values += [*fn.args, *fn.keywords.values()]
        fn = fn.func
    budget = _MAX_VALUES

    def collect(value: object, depth: int) -> None:
        nonlocal budget
        budget -= 1
        if budget < 0:
            return
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("utf-8", "replace")
        if isinstance(value, str):
            if len(value) >= MIN_REDACTED_LENGTH:
                found.add(value)
                found.add(repr(value)[1:-1])  # as it appears inside a repr()
            return
        if isinstance(value, int) and not isinstance(value, bool):
            if 10 ** (MIN_REDACTED_DIGITS - 1) <= abs(value) < 10**_MAX_REDACTED_DIGITS:
                found.add(str(abs(value)))  # a negative one's digits follow its sign
            return
        if isinstance(value, uuid.UUID):
            found.add(str(value))
            found.add(value.hex)
            return
        if depth >= MAX_DEPTH:
            return
        items = _items(value)
        if items is not None:
            for item in itertools.islice(items, _MAX_ITEMS):
                collect(item, depth + 1)

    for value in values:
        collect(value, 0)
    return sorted(found, key=len, reverse=True)


def _items(value: object) -> Iterable[object] | None:
    """What a container or a data object holds: a mapping's keys and values, a collection's
    items, the fields of a dataclass, a pydantic model or an attrs class; ``None`` for
    anything else (an arbitrary object's attributes are not data the caller passed)."""
    if isinstance(value, Mapping):
        return (*value.keys(), *value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return value
    if isinstance(value, type):
        return None
    if dataclasses.is_dataclass(value):
        return (getattr(value, field.name) for field in dataclasses.fields(value))
    kind = type(value)
    fields = getattr(kind, "__pydantic_fields__", None)  # pydantic 2
    if isinstance(fields, Mapping):
        return (getattr(value, name, None) for name in fields)
    attributes = getattr(kind, "__attrs_attrs__", None)
    if attributes is not None:
        return (getattr(value, attribute.name, None) for attribute in attributes)
    return None


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def safe_message(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder when the exception's ``__str__`` itself raises."""
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__qualname__} whose str() raised>"


def redacted_exception(exc: BaseException, secrets: list[str]) -> tuple[str, str]:
    """The exception's message and its traceback, messages redacted, frames as they are.

    Never raises, whatever the exception's ``__str__`` or ``__repr__`` do.
    """
    message = redact(safe_message(exc), secrets)
    try:
        stacktrace = "".join(_Traceback(secrets).lines(exc))
    except Exception:  # a pathological exception: keep its type, lose its traceback
        stacktrace = f"{type(exc).__qualname__}: {message}\n"
    return message, stacktrace


class _Traceback:
    """Python's rendering of an exception (``TracebackException.format``): the exceptions it was
    raised from or while handling, and an exception group's sub-exceptions, each with its
    frames, nested behind ``|`` margins; but every message redacted, and bounded in all."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = secrets
        self.group_depth = 0
        self.need_close = False  # the group's closing line is still to be written
        self.seen: set[int] = set()
        self.remaining = MAX_EXCEPTIONS

    def lines(self, exc: BaseException) -> Iterator[str]:
        self.seen.add(id(exc))
        chain: list[tuple[BaseException, str]] = [(exc, "")]
        while len(chain) < _MAX_CHAIN:
            current = chain[-1][0]
            if current.__cause__ is not None:
                earlier, separator = current.__cause__, _CAUSE
            elif current.__context__ is not None and not current.__suppress_context__:
                earlier, separator = current.__context__, _CONTEXT
            else:
                break
            if id(earlier) in self.seen:  # written already, or a cycle
                break
            self.seen.add(id(earlier))
            chain.append((earlier, separator))
        self.remaining -= len(chain)
        for current, separator in reversed(chain):
            yield from self.exception(current)
            yield from self.emit(separator)

    def exception(self, exc: BaseException) -> Iterator[str]:
        exceptions = _sub_exceptions(exc)
        if exceptions is not None and self.group_depth > MAX_GROUP_DEPTH:
            yield from self.emit(f"... (max_group_depth is {MAX_GROUP_DEPTH})\n")
            return
        stack = traceback.extract_tb(exc.__traceback__).format()
        message = [redact(line, self.secrets) for line in traceback.format_exception_only(exc)]
        if exceptions is not None:
            yield from self.group(exceptions, stack, message)
            return
        if stack:
            yield from self.emit("Traceback (most recent call last):\n", *stack)
        yield from self.emit(*message)

    def group(
        self, exceptions: Sequence[BaseException], stack: list[str], message: list[str]
    ) -> Iterator[str]:
        outermost = self.group_depth == 0
        if outermost:
            self.group_depth = 1
        if stack:
            title = "Exception Group Traceback (most recent call last):\n"
            yield from self.emit(title, margin="+" if outermost else "|")
            yield from self.emit(*stack)
        yield from self.emit(*message)
        self.need_close = False
        for index, exc in enumerate(exceptions):
            truncated = index >= MAX_GROUP_WIDTH or self.remaining <= 0
            last = truncated or index == len(exceptions) - 1
            if last:  # unless a nested group's closing line, written first, closes this one too
                self.need_close = True
            number = "..." if truncated else str(index + 1)
            corner = "  " if index else "+-"
            yield f"{self.indent()}{corner}+---------------- {number} ----------------\n"
            self.group_depth += 1
            if truncated:
                more = len(exceptions) - index
                yield from self.emit(f"and {more} more exception{'s' if more > 1 else ''}\n")
            else:
                yield from self.lines(exc)
            if last and self.need_close:
                yield f"{self.indent()}+------------------------------------\n"
                self.need_close = False
            self.group_depth -= 1
            if last:
                break
        if outermost:
            self.group_depth = 0

    def indent(self) -> str:
        return "  " * self.group_depth

    def emit(self, *texts: str, margin: str = "|") -> Iterator[str]:
        prefix = f"{self.indent()}{margin} " if self.group_depth else ""
        for text in texts:
            for line in text.splitlines(keepends=True):
                yield prefix + line


def _sub_exceptions(exc: BaseException) -> Sequence[BaseException] | None:
    """An exception group's exceptions; ``None`` for any other exception."""
    if sys.version_info >= (3, 11):
        group_type: object = builtins.BaseExceptionGroup
    else:
        # Python 3.10's groups come from the backport (anyio's, for one): if it was never
        # imported, there are none.
        group_type = getattr(sys.modules.get("exceptiongroup"), "BaseExceptionGroup", None)
    if not isinstance(group_type, type) or not isinstance(exc, group_type):
        return None
    exceptions: Sequence[BaseException] = getattr(exc, "exceptions", ())
    return exceptions


def exception_text(
    exc: BaseException, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[str, str]:
    """:func:`redacted_exception` for an exception of a task called as ``fn(*args, **kwargs)``."""
    return redacted_exception(exc, argument_strings(fn, args, kwargs))
