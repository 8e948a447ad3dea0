"""What each framework needs from the middleware beyond the server contract (uvicorn,
and granian where it matters): running without lifespan, and Django, which does not speak
lifespan at all."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest

from .frameworks import FRAMEWORKS, Probe, build
from .servers import serve_granian, serve_uvicorn

pytestmark = [pytest.mark.anyio, pytest.mark.server]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("serve", [serve_uvicorn, serve_granian], ids=["uvicorn", "granian"])
async def test_without_lifespan_side_effects_still_run_after_the_response(
    framework: str, serve: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """``uvicorn --lifespan off`` / ``granian --interface asginl``: no executor, so each
    request's call runs its side effects itself, after the final body."""
    caplog.set_level(logging.WARNING, logger="after_response")
    probe = Probe()
    app = build(framework, probe)
    async with serve(app.app, lifespan="off") as url:
        async with httpx.AsyncClient(base_url=url) as client:
            with anyio.fail_after(5):
                first = await client.get("/stream", params={"id": 1})
                second = await client.get("/effect", params={"id": 2})
        assert (first.text, second.text) == ("streamed 1", "queued 2")
        assert await app.middleware.drain(timeout=5)
    assert probe.events.index("sent 1") < probe.events.index("started 1")
    assert probe.events.index("sent 2") < probe.events.index("started 2")
    assert sorted(probe.done()) == [1, 2]
    assert "app shutdown" not in probe.events
    no_lifespan = [r for r in caplog.records if "before lifespan startup" in r.getMessage()]
    assert len(no_lifespan) == 1


async def test_the_middleware_answers_lifespan_for_django(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Django's ASGI handler raises on the lifespan scope; the middleware notes it once and
    answers lifespan itself, so side effects run in the background executor."""
    caplog.set_level(logging.INFO, logger="after_response")
    probe = Probe()
    app = build("django", probe)
    # Bounded as a whole: run inline instead, the task (whose gate opens at lifespan
    # shutdown) would keep uvicorn waiting for its connection forever.
    with anyio.fail_after(20):
        async with serve_uvicorn(app.app) as url, httpx.AsyncClient(base_url=url) as client:
            response = await client.get("/effect", params={"id": 1, "block": 1})
            assert response.text == "queued 1"
            await probe.wait_for("started 1")
            assert app.middleware.stats().running == 1
    assert probe.done() == [1]
    messages = [record.getMessage() for record in caplog.records]
    assert any("does not support the lifespan protocol" in m for m in messages)
    assert not any("before lifespan startup" in m for m in messages)
