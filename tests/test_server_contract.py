"""The contract every framework keeps under every server (real servers on 127.0.0.1).

Each test runs the same small app (tests/frameworks/) built with Starlette, FastAPI,
Litestar, Quart, Django or as a bare ASGI callable, served by uvicorn (h11 on asyncio, and
httptools on uvloop as ``uvicorn[standard]`` runs), hypercorn and granian (embedded), all
in the test's own event loop.
"""

from __future__ import annotations

import anyio
import httpx
import pytest

from after_response import Collector

from .frameworks import FRAMEWORKS, Probe, build
from .servers import SERVERS, UVLOOP_SERVERS

pytestmark = [pytest.mark.anyio, pytest.mark.server]


@pytest.fixture(params=FRAMEWORKS)
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


ALL_SERVERS = {**SERVERS, **UVLOOP_SERVERS}


@pytest.fixture(params=sorted(ALL_SERVERS))
def server(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def anyio_backend(server: str) -> str | tuple[str, dict[str, bool]]:
    """The test's own loop, which an in-process server shares: uvloop for uvloop servers."""
    return ("asyncio", {"use_uvloop": True}) if server in UVLOOP_SERVERS else "asyncio"


async def test_client_has_the_whole_response_while_its_side_effect_is_blocked(
    framework: str, server: str
) -> None:
    probe = Probe()
    app = build(framework, probe)
    async with ALL_SERVERS[server](app.app) as url, httpx.AsyncClient(base_url=url) as client:
        with anyio.fail_after(5):
            response = await client.get("/stream", params={"id": 1, "block": 1})
        assert (response.status_code, response.text) == (200, "streamed 1")
        await probe.wait_for("started 1")
        # The side effect started only once the server had the final body (the stream
        # gave the loop away between chunks), and it still waits for the gate.
        *chunks, sent, started = probe.events
        assert chunks
        assert set(chunks) == {"chunk 1"}
        assert (sent, started) == ("sent 1", "started 1")
        assert app.middleware.stats().running == 1
        probe.gate.set()
        assert await app.middleware.drain(timeout=5)
    assert probe.done() == [1]


async def test_side_effects_of_concurrent_requests_all_run(framework: str, server: str) -> None:
    probe = Probe()
    app = build(framework, probe)
    async with ALL_SERVERS[server](app.app) as url, httpx.AsyncClient(base_url=url) as client:
        with anyio.fail_after(10):
            responses = await _get_all(client, [f"/effect?id={n}" for n in range(8)])
        assert [response.status_code for response in responses] == [200] * 8
        assert await app.middleware.drain(timeout=5)
        stats = app.middleware.stats()
    assert sorted(probe.done()) == list(range(8))
    assert (stats.added, stats.succeeded) == (8, 8)


async def test_side_effects_of_a_failed_request_are_discarded(framework: str, server: str) -> None:
    probe = Probe()
    app = build(framework, probe)
    async with ALL_SERVERS[server](app.app) as url, httpx.AsyncClient(base_url=url) as client:
        with anyio.fail_after(5):
            answered_500 = await client.get("/fail", params={"id": 1})
            raised = await client.get("/raise", params={"id": 2})
            ok = await client.get("/effect", params={"id": 3})
        assert (answered_500.status_code, raised.status_code, ok.status_code) == (500, 500, 200)
        assert await app.middleware.drain(timeout=5)
        stats = app.middleware.stats()
    assert probe.done() == [3]
    assert (stats.discarded, stats.succeeded) == (2, 1)


async def test_shutdown_drains_side_effects_before_the_app_shuts_down(
    framework: str, server: str
) -> None:
    probe = Probe()
    app = build(framework, probe)
    # Bounded as a whole: were the task not drained by lifespan shutdown (which opens its
    # gate), the server would wait for it forever.
    with anyio.fail_after(20):
        async with ALL_SERVERS[server](app.app) as url, httpx.AsyncClient(base_url=url) as client:
            response = await client.get("/effect", params={"id": 1, "block": 1})
            assert response.status_code == 200
            await probe.wait_for("started 1")
    # Lifespan shutdown opened the gate; the task ran to its end before the app (if it
    # has a lifespan of its own) was told to shut down, and before shutdown completed.
    app_shutdown = ["app shutdown"] if app.app_lifespan else []
    # (Some frameworks send even a short body as a chunk, then an empty final body.)
    assert [event for event in probe.events if not event.startswith("chunk ")] == [
        "sent 1",
        "started 1",
        "server shutdown",
        "done 1",
        *app_shutdown,
        "shutdown complete",
    ]
    assert app.middleware.stats().succeeded == 1


async def test_each_request_gets_a_collector_of_its_own(framework: str, server: str) -> None:
    probe = Probe()
    app = build(framework, probe)
    async with ALL_SERVERS[server](app.app) as url, httpx.AsyncClient(base_url=url) as client:
        with anyio.fail_after(10):
            responses = await _get_all(client, [f"/collector?id={n}" for n in range(5)])
    assert [response.status_code for response in responses] == [200] * 5
    assert sorted(probe.collectors) == list(range(5))
    for ways in probe.collectors.values():
        # request.state, current() (and FastAPI's dependency) give the very same object.
        assert isinstance(ways[0], Collector)
        assert all(way is ways[0] for way in ways)
    assert len({id(ways[0]) for ways in probe.collectors.values()}) == 5


async def _get_all(client: httpx.AsyncClient, paths: list[str]) -> list[httpx.Response]:
    """GET every path concurrently; the responses in the order of ``paths``."""
    responses: dict[int, httpx.Response] = {}

    async def get(index: int, path: str) -> None:
        responses[index] = await client.get(path)

    async with anyio.create_task_group() as task_group:
        for index, path in enumerate(paths):
            task_group.start_soon(get, index, path)
    return [responses[index] for index in range(len(paths))]
