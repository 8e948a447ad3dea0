"""``NameLimits.wait``: a coroutine waits in its name's line (the engine worker's way) and,
cancelled, holds nothing, whether it was still in line or had just been given its slot."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from after_response._limited import NameLimits
from after_response._limits import Limits
from after_response._options import NO_RETRY
from after_response._record import RequestInfo, TaskRecord
from after_response._task import Task

pytestmark = pytest.mark.anyio

ONE_AT_A_TIME = Limits(max_concurrency=1)


def task_of(name: str, number: int) -> Task:
    record = TaskRecord(
        f"id-{number}",
        name,
        None,
        (),
        {},
        None,
        NO_RETRY,
        False,
        RequestInfo("-", "-"),
        limits=ONE_AT_A_TIME,
    )
    return Task(record, print, False, contextvars.Context(), number)


async def waiting(limits: NameLimits, task: Task) -> asyncio.Future[None]:
    """``limits.wait(task)`` in a task of its own, once it waits."""
    entered = asyncio.Event()

    async def wait() -> None:
        entered.set()  # this step goes on into limits.wait(), up to its await: in line
        await limits.wait(task)

    future = asyncio.ensure_future(wait())
    await entered.wait()
    return future


async def three_in_line() -> tuple[
    NameLimits, list[Task], asyncio.Future[None], asyncio.Future[None]
]:
    """Three tasks of a name with ``max_concurrency=1``: the first holds the slot, the
    second and the third wait in line, in coroutines of their own."""
    limits = NameLimits()
    tasks = [task_of("crm", number) for number in (1, 2, 3)]
    assert [limits.admit(task) for task in tasks] == [True, False, False]
    second = await waiting(limits, tasks[1])
    third = await waiting(limits, tasks[2])
    return limits, tasks, second, third


async def test_a_release_wakes_the_first_waiter_with_its_slot() -> None:
    limits = NameLimits()
    first, second = task_of("crm", 1), task_of("crm", 2)
    assert limits.admit(first)
    assert not limits.admit(second)
    woken = await waiting(limits, second)
    limits.release(first)
    await woken
    assert (second.gated, limits.parked) == (True, 0)


async def test_a_waiter_cancelled_in_line_leaves_it_and_frees_nothing() -> None:
    limits, (first, second, third), cancelled, behind = await three_in_line()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert (second.gated, limits.parked) == (False, 1)
    assert not behind.done()  # the first still holds the one slot
    limits.release(first)
    await behind
    assert third.gated


@pytest.mark.parametrize(
    "cancelled_first", [False, True], ids=["given-then-cancelled", "cancelled-then-given"]
)
async def test_a_waiter_cancelled_as_it_is_given_its_slot_passes_it_on(
    cancelled_first: bool,
) -> None:
    limits, (first, second, third), cancelled, behind = await three_in_line()
    # In one step, before the waiter can resume: it is given the slot and cancelled.
    if cancelled_first:
        cancelled.cancel()
        limits.release(first)
    else:
        limits.release(first)
        cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await behind
    assert (second.gated, third.gated, limits.parked) == (False, True, 0)
