"""Tracebacks with their messages redacted: written as Python writes them, exception groups too.

On Python 3.10 the groups are the ``exceptiongroup`` backport's (anyio's dependency there).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

import pytest

from after_response._redact import MAX_EXCEPTIONS, exception_text, redacted_exception

if sys.version_info >= (3, 11):
    from builtins import ExceptionGroup
else:
    from exceptiongroup import ExceptionGroup

SECRET = "SECRET-TOKEN-123"


def raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback of its own."""
    try:
        raise exc
    except BaseException as caught:
        return caught


def chained() -> BaseException:
    try:
        try:
            raise KeyError(f"no row for {SECRET}")
        except KeyError as exc:
            raise ValueError("lookup failed") from exc
    except ValueError:
        return raised(RuntimeError(f"while handling {SECRET}"))


def raised_from(cause: BaseException) -> BaseException:
    try:
        raise RuntimeError(f"gave up on {SECRET}") from cause
    except RuntimeError as exc:
        return exc


def group(message: str, *exceptions: BaseException) -> BaseException:
    return raised(ExceptionGroup(message, list(exceptions)))


def nested(depth: int) -> BaseException:
    if depth == 0:
        return raised(ValueError(SECRET))
    return group(f"level {depth} of {SECRET}", nested(depth - 1))


EXCEPTIONS: dict[str, Callable[[], BaseException]] = {
    "plain": lambda: raised(ValueError(f"bad {SECRET}")),
    "chained": chained,
    "group": lambda: group(
        f"sync {SECRET}", raised(ConnectionError(f"refused {SECRET}")), raised(KeyError(SECRET))
    ),
    "group in a group": lambda: group(
        "outer",
        group("inner", raised(ValueError(SECRET)), raised(TypeError("t"))),
        raised(OSError(SECRET)),
    ),
    "group in a group, last": lambda: group(
        "outer", raised(OSError(SECRET)), group("inner", raised(ValueError(SECRET)))
    ),
    "chains in a group": lambda: group("two", chained(), raised(ValueError(SECRET))),
    "group as a cause": lambda: raised_from(group("g", raised(ValueError(SECRET)))),
    "16 wide (Python writes 15)": lambda: group("wide", *(ValueError(SECRET) for _ in range(16))),
    "13 deep (Python writes 11)": lambda: nested(13),
}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="3.10 writes no groups by itself")
@pytest.mark.parametrize("make", EXCEPTIONS.values(), ids=EXCEPTIONS.keys())
def test_tracebacks_are_pythons_with_the_arguments_redacted(
    make: Callable[[], BaseException],
) -> None:
    exc = make()
    python = "".join(traceback.format_exception(exc))
    assert SECRET in python
    _, stacktrace = redacted_exception(exc, [SECRET])
    assert stacktrace == python.replace(SECRET, "[redacted]")


def test_a_group_shows_each_sub_exception_with_its_traceback_and_redacted_message() -> None:
    def call_crm() -> None:
        raise ConnectionError(f"crm refused {SECRET}")

    def call_billing() -> None:
        raise KeyError(f"no plan for {SECRET}")

    errors = []
    for call in (call_crm, call_billing):
        try:
            call()
        except Exception as exc:
            errors.append(exc)
    message, stacktrace = redacted_exception(group(f"sync {SECRET}", *errors), [SECRET])

    assert message == "sync [redacted] (2 sub-exceptions)"
    assert SECRET not in stacktrace
    # exceptiongroup.ExceptionGroup on 3.10
    assert "ExceptionGroup: sync [redacted] (2 sub-exceptions)\n" in stacktrace
    for call, line in [
        (call_crm, "| ConnectionError: crm refused [redacted]"),
        (call_billing, "| KeyError: 'no plan for [redacted]'"),
    ]:
        frame = f'{__file__}", line {call.__code__.co_firstlineno + 1}, in {call.__name__}'
        assert frame in stacktrace
        assert line in stacktrace


def test_a_huge_group_is_cut_short() -> None:
    """15 wide and 10 deep is what Python cuts at; 15 groups of 15 groups of 15 errors would
    still be 3,600 tracebacks."""
    exc = group("top", *(group("middle", *(group("bottom", *[KeyError(SECRET)] * 15),) * 15),) * 15)
    _, stacktrace = redacted_exception(exc, [SECRET])
    written = stacktrace.count("KeyError:") + stacktrace.count("ExceptionGroup:")
    assert written <= MAX_EXCEPTIONS
    assert "| and 14 more exceptions" in stacktrace
    assert SECRET not in stacktrace


def test_integer_arguments_of_six_digits_or_more_are_redacted() -> None:
    def charge(account: int, amount: int, *, refund: bool, ids: list[int]) -> None:
        pass

    exc = raised(ValueError("account 987654321123 cannot pay 12345 (refund True) for -4567890"))
    # 10**5000 has too many digits for str(): skipped, not raised on
    ids = [-4567890, 10**5000]
    message, _ = exception_text(exc, charge, (987654321123, 12345), {"refund": True, "ids": ids})
    assert message == "account [redacted] cannot pay 12345 (refund True) for -[redacted]"


def test_uuids_nested_values_and_data_objects_among_the_arguments_are_redacted() -> None:
    import dataclasses
    import uuid

    import attrs
    import pydantic

    class Customer(pydantic.BaseModel):
        email: str

    @attrs.define
    class Card:
        number: str

    @dataclasses.dataclass
    class Order:
        customers: list[Customer]

    def sync(order: Order, *, card: Card, token: uuid.UUID, extra: dict[str, object]) -> None:
        pass

    token = uuid.UUID("6f1c1a4e-3b5d-4c8e-9a2f-0d7e5b9c1a23")
    extra = {"meta": {"trace": {"note": "three-levels-in"}}, "deeper": {"a": {"b": {"c": "4-in"}}}}
    exc = raised(
        ValueError(
            f"refused deep@example.com, card 4111-1111, token {token} ({token.hex}), "
            "saw three-levels-in, 4-in"
        )
    )
    message, stacktrace = exception_text(
        exc,
        sync,
        (Order([Customer(email="deep@example.com")]),),
        {"card": Card("4111-1111"), "token": token, "extra": extra},
    )
    assert message == (
        "refused [redacted], card [redacted], token [redacted] ([redacted]), saw [redacted], 4-in"
    )
    assert "deep@example.com" not in stacktrace
    assert str(token) not in stacktrace


def test_redaction_looks_at_a_bounded_number_of_values() -> None:
    def flood(items: list[list[str]]) -> None:
        pass

    # 20 lists of 100 strings: past the first 1,000 values (the lists count too), none is read.
    items = [[f"value-{i:02}-{j:03}" for j in range(100)] for i in range(20)]
    exc = raised(ValueError("value-00-000 and value-19-099"))
    message, _ = exception_text(exc, flood, (items,), {})
    assert message == "[redacted] and value-19-099"
