"""The native asyncio task owner: deadlines with one timer, and nothing left behind."""

from __future__ import annotations

import asyncio

import pytest

from after_response._tasks import HAS_UNCANCEL, NativeTasks

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not HAS_UNCANCEL, reason="deadlines need Task.uncancel (3.11+)"),
]


async def test_a_deadline_cancels_only_the_late_attempt_and_no_timer_outlives_them() -> None:
    tasks = NativeTasks()
    outcomes: dict[str, bool] = {}
    both_ended = asyncio.Event()
    late_started = asyncio.Event()
    quick = asyncio.Event()

    async def late() -> None:
        late_started.set()
        await asyncio.Event().wait()  # never set: only the deadline ends it

    async def attempt(name: str) -> None:
        call = late() if name == "late" else quick.wait()
        outcomes[name] = await tasks.run_with_deadline(0.05 if name == "late" else 60, call)
        if name == "late":
            quick.set()  # the quick one ends last, its 60 s deadline still being watched
        if len(outcomes) == 2:
            both_ended.set()

    tasks.start_soon(attempt, "late")
    tasks.start_soon(attempt, "quick")
    await late_started.wait()
    await both_ended.wait()
    assert outcomes == {"late": False, "quick": True}
    # No deadline left to watch: no timer keeps the owner (one per request without lifespan)
    # alive on the loop for the rest of the longest timeout.
    assert tasks._timer is None
    await tasks.aclose()
