"""Every fault ends in one accounted state and the server keeps serving (issue 9), on real
servers in the test's own loop: BaseExceptions from side effects, exceptions whose str()
raises, generator functions, dead-letter hooks, add() messages, overflow accounting,
drain() under load, late adds, and what a cancelled task's log line says."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message

from after_response import AfterResponseMiddleware, Collector, DeadLetter, Retry, Stats, current

from .apps import app_adding
from .asgi import call, http_scope
from .servers import SERVERS, serve_uvicorn

pytestmark = [pytest.mark.anyio, pytest.mark.server]

SECRET = "alice@example.com-token-8f3a"
LOGGER = "after_response"


# -- helpers ---------------------------------------------------------------------------------


def assert_identity(stats: Stats) -> None:
    """The accounting identity of docs/semantics.md, at one snapshot."""
    assert stats.added == (
        stats.collected
        + stats.pending
        + stats.running
        + stats.succeeded
        + stats.failed
        + stats.timed_out
        + stats.discarded
        + stats.shed
        + stats.abandoned
    ), stats


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll ``condition`` on the loop until it holds; fail after ``seconds``."""
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110 - counts that no event announces
            await anyio.sleep(0.005)


def formatted(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every captured record as a handler would write it, traceback text included."""
    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
    return [formatter.format(record) for record in caplog.records]


def task_lines(caplog: pytest.LogCaptureFixture, name: str, *words: str) -> list[str]:
    """The messages about the task ``name`` (a local function's name will do) with ``words``."""
    return [
        record.getMessage()
        for record in caplog.records
        if str(getattr(record, "task_name", "")).rsplit(".", 1)[-1] == name
        and all(word in record.getMessage() for word in words)
    ]


def app_with_shutdown(events: list[str], *routes: Route) -> Starlette:
    """A Starlette app whose own lifespan shutdown appends ``"app shutdown"``."""

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        events.append("app shutdown")

    return Starlette(routes=list(routes), lifespan=lifespan)


# -- 1. BaseException from a side effect ------------------------------------------------------


class CustomBaseError(BaseException):
    """A BaseException subclass of the application's own."""


async def raises_keyboard_interrupt(token: str) -> None:
    raise KeyboardInterrupt(f"interrupted for {token}")


async def raises_system_exit(token: str) -> None:
    raise SystemExit(f"exiting for {token}")


def calls_sys_exit(token: str) -> None:
    sys.exit(f"exiting for {token}")


async def raises_generator_exit(token: str) -> None:
    raise GeneratorExit(f"closing for {token}")


async def raises_custom_base_error(token: str) -> None:
    raise CustomBaseError(f"custom for {token}")


BASE_EXCEPTIONS = [
    pytest.param(raises_keyboard_interrupt, KeyboardInterrupt, id="KeyboardInterrupt"),
    pytest.param(raises_system_exit, SystemExit, id="SystemExit"),
    pytest.param(calls_sys_exit, SystemExit, id="sys.exit-in-sync-task"),
    pytest.param(raises_generator_exit, GeneratorExit, id="GeneratorExit"),
    pytest.param(raises_custom_base_error, CustomBaseError, id="custom-BaseException"),
]


@pytest.mark.parametrize("server", sorted(SERVERS))
@pytest.mark.parametrize(("raiser", "raised"), BASE_EXCEPTIONS)
async def test_a_base_exception_from_a_side_effect_fails_that_task_only(
    server: str,
    raiser: Callable[[str], Any],
    raised: type[BaseException],
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []
    letters: list[DeadLetter] = []
    release = anyio.Event()

    async def concurrent() -> None:
        await release.wait()  # running before the raiser raises, and after
        events.append("concurrent task done")

    async def later() -> None:
        events.append("later task done")

    async def first(request: Request) -> Response:
        request.state.after_response.add(concurrent)
        request.state.after_response.add(raiser, SECRET)
        return PlainTextResponse("ok")

    async def second(request: Request) -> Response:
        request.state.after_response.add(later)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(
        app_with_shutdown(events, Route("/first", first), Route("/second", second)),
        on_dead_letter=letters.append,
    )
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with SERVERS[server](middleware) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/first")).text == "ok"
        await until(lambda: middleware.stats().failed == 1)
        stats = middleware.stats()
        assert_identity(stats)
        assert (stats.running, stats.succeeded) == (1, 0)  # the other task still runs
        release.set()
        assert (await client.get("/second")).text == "ok"  # the server still serves
        assert await middleware.drain(timeout=5)
        stats = middleware.stats()
        assert_identity(stats)
        assert (stats.added, stats.succeeded, stats.failed) == (3, 2, 1)
    # The lifespan held: the later request used the executor, the app's shutdown ran.
    assert events == ["concurrent task done", "later task done", "app shutdown"]
    assert not [line for line in formatted(caplog) if "before lifespan startup" in line]
    [letter] = letters
    assert (letter.task_name, letter.outcome, type(letter.exception)) == (
        raiser.__qualname__,
        "failed",
        raised,
    )
    [line] = task_lines(caplog, raiser.__qualname__, "failed after 1 attempt(s)")
    assert f"it raised {raised.__qualname__}" in line
    assert not [line for line in formatted(caplog) if SECRET in line]
    assert any("[redacted]" in line for line in formatted(caplog))


# -- 2. An exception whose __str__ and __repr__ raise ----------------------------------------


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise ValueError("no str for you")

    def __repr__(self) -> str:
        raise ValueError("no repr either")


async def raises_unprintable() -> None:
    raise UnprintableError


async def test_an_exception_whose_str_raises_is_logged_counted_dead_lettered_and_traced(
    caplog: pytest.LogCaptureFixture,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    letters: list[DeadLetter] = []

    async def endpoint(request: Request) -> Response:
        request.state.after_response.add(raises_unprintable)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]),
        on_dead_letter=letters.append,
        tracer_provider=tracer_provider,
        log_interval=1e-9,  # each failure's line in full: this test reads both
    )
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/")).text == "ok"
        assert await middleware.drain(timeout=5)
        assert (await client.get("/")).text == "ok"
        assert await middleware.drain(timeout=5)
    stats = middleware.stats()
    assert_identity(stats)
    assert (stats.added, stats.failed) == (2, 2)
    assert [type(letter.exception) for letter in letters] == [UnprintableError] * 2
    lines = task_lines(caplog, "raises_unprintable", "failed after 1 attempt(s)")
    assert len(lines) == 2
    failures = [r for r in caplog.records if r.getMessage() in lines]
    assert [r.error_type for r in failures] == [f"{__name__}.UnprintableError"] * 2  # type: ignore[attr-defined]
    assert all("UnprintableError" in str(r.exc_text).splitlines()[-1] for r in failures)
    spans = [s for s in exporter.get_finished_spans() if s.name.endswith("raises_unprintable")]
    assert len(spans) == 2
    for span in spans:
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes is not None
        assert span.attributes["error.type"] == f"{__name__}.UnprintableError"
        [event] = span.events
        assert event.attributes is not None
        assert "whose str() raised" in str(event.attributes["exception.message"])


# -- 5. Generator functions are rejected at add() ---------------------------------------------


def yields_rows() -> Iterator[int]:
    yield 1


async def yields_rows_async() -> AsyncIterator[int]:
    yield 1


@pytest.mark.parametrize(
    ("generator", "kind"),
    [(yields_rows, "a generator"), (yields_rows_async, "an async generator")],
    ids=["generator", "async-generator"],
)
async def test_a_generator_function_is_rejected_at_add_saying_what_to_do(
    generator: Callable[[], Any], kind: str
) -> None:
    async def endpoint(request: Request) -> Response:
        try:
            request.state.after_response.add(generator)
        except TypeError as error:
            return PlainTextResponse(str(error), status_code=400)
        return PlainTextResponse("accepted")

    middleware = AfterResponseMiddleware(Starlette(routes=[Route("/", endpoint)]))
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/")
    assert response.status_code == 400
    assert response.text.startswith(f"{generator.__qualname__} is {kind} function")
    assert "its body would never run" in response.text
    assert "Make the side effect a plain function or an async def without yield" in response.text
    assert middleware.stats().added == 0


# -- 6. Dead-letter hooks ---------------------------------------------------------------------


class AsyncHook:
    async def __call__(self, letter: DeadLetter) -> None: ...


async def async_hook(letter: DeadLetter) -> None: ...


@pytest.mark.parametrize("hook", [async_hook, AsyncHook()], ids=["function", "callable-object"])
async def test_an_async_dead_letter_hook_is_rejected_when_the_middleware_is_built(
    hook: Any,
) -> None:
    with pytest.raises(TypeError, match=r"on_dead_letter must be a plain \(def\) function"):
        AfterResponseMiddleware(Starlette(), on_dead_letter=hook)


async def test_a_slow_dead_letter_hook_does_not_stall_requests() -> None:
    hook_running = threading.Event()
    release = threading.Event()
    seen: list[str] = []

    def slow_hook(letter: DeadLetter) -> None:
        hook_running.set()
        release.wait(30)  # blocked until the test has been served meanwhile
        seen.append(letter.task_name)

    async def fails() -> None:
        raise ConnectionError("down")

    async def endpoint(request: Request) -> Response:
        for _ in range(5):
            request.state.after_response.add(fails)
        return PlainTextResponse("ok")

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/fail", endpoint), Route("/health", health)]),
        on_dead_letter=slow_hook,
    )
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/fail")
        await until(hook_running.is_set)
        # The hook is blocked right now; were it on the event loop, nothing would answer.
        with anyio.fail_after(10):
            for _ in range(5):
                assert (await client.get("/health")).text == "ok"
        assert not release.is_set()
        assert seen == []  # still blocked while every request was served
        release.set()
        assert await middleware.drain(timeout=5)
    assert seen == ["test_a_slow_dead_letter_hook_does_not_stall_requests.<locals>.fails"] * 5


async def test_dead_letters_a_stuck_hook_never_started_on_are_logged_and_counted_at_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server stops while the hook is stuck on its first dead letter: the others would
    die with its daemon thread. Shutdown gives the hook what is left of shutdown_timeout,
    then gives those up, by name and count, never silently."""
    in_hook: list[str] = []
    release = threading.Event()

    def stuck_hook(letter: DeadLetter) -> None:
        in_hook.append(letter.task_name)
        release.wait(30)

    async def send_receipt() -> None:
        raise ConnectionError("down")

    async def sync_crm() -> None:
        raise ConnectionError("down")

    async def endpoint(request: Request) -> Response:
        for effect in (send_receipt, sync_crm, send_receipt, sync_crm, send_receipt):
            request.state.after_response.add(effect)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]), on_dead_letter=stuck_hook, shutdown_timeout=0.5
    )
    caplog.set_level(logging.INFO, logger=LOGGER)
    try:
        async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/")).text == "ok"
            await until(lambda: middleware.stats().failed == 5 and len(in_hook) == 1)
    finally:
        release.set()
    assert middleware.stats().dead_letters_lost == 4
    [line] = [r for r in caplog.records if "never reached on_dead_letter" in r.getMessage()]
    assert line.levelno == logging.ERROR
    prefix = "test_dead_letters_a_stuck_hook_never_started_on_are_logged_and_counted_at_shutdown"
    expected = {f"{prefix}.<locals>.send_receipt": 3, f"{prefix}.<locals>.sync_crm": 2}
    expected[in_hook[0]] -= 1
    assert line.dead_letters_lost == expected  # type: ignore[attr-defined]
    assert line.getMessage().startswith("after-response: 4 dead letter(s) never reached")
    assert ", ".join(f"{name}: {n}" for name, n in sorted(expected.items())) in line.getMessage()


# -- 7. add() messages ------------------------------------------------------------------------


async def notify(user_id: int) -> None: ...


async def call_api(user_id: int, api_key: str = "sk-secret-default") -> None: ...


@pytest.mark.parametrize(
    ("option", "value"),
    [("timeout", 5), ("retry", Retry(attempts=2)), ("name", "n"), ("run_on_error", True)],
)
async def test_an_option_given_to_add_points_to_options(option: str, value: object) -> None:
    async def endpoint(request: Request) -> Response:
        try:
            request.state.after_response.add(notify, 1, **{option: value})
        except TypeError as error:
            return PlainTextResponse(str(error), status_code=400)
        return PlainTextResponse("accepted")

    middleware = AfterResponseMiddleware(Starlette(routes=[Route("/", endpoint)]))
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get("/")
    assert response.status_code == 400
    assert f"notify() has no parameter '{option}'" in response.text
    assert f".options({option}=...).add(notify, ...)" in response.text


async def test_an_arity_error_shows_the_signature_without_default_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def endpoint(request: Request) -> Response:
        request.state.after_response.add(call_api)  # user_id missing: the handler fails
        return PlainTextResponse("accepted")

    middleware = AfterResponseMiddleware(Starlette(routes=[Route("/", endpoint)]))
    server_log = logging.getLogger("uvicorn.error")  # where uvicorn logs the handler's error
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        server_log.addHandler(caplog.handler)  # once uvicorn has configured its logging
        try:
            assert (await client.get("/")).status_code == 500
        finally:
            server_log.removeHandler(caplog.handler)
    [error] = [r for r in caplog.records if r.exc_info and r.exc_info[0] is TypeError]
    message = str(error.exc_info[1])  # type: ignore[index]
    # (The annotations are strings here: this module uses `from __future__ import annotations`.)
    assert message == (
        "add(call_api, ...): the arguments do not fit call_api(user_id: 'int', api_key: 'str')"
        " -> 'None': missing a required argument: 'user_id'"
    )
    assert not [line for line in formatted(caplog) if "sk-secret-default" in line]
    assert "sk-secret-default" not in caplog.text


# -- 8. Overflow accounting -------------------------------------------------------------------


async def test_overflow_runs_one_queues_one_lets_one_wait_and_sheds_the_rest_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = anyio.Event()
    snapshots: list[Stats] = []

    async def blocked() -> None:
        await release.wait()

    async def endpoint(request: Request) -> Response:
        for _ in range(10):
            request.state.after_response.add(blocked)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]),
        max_concurrency=1,
        max_pending=1,
        overflow_timeout=1.0,
        log_interval=1e-9,  # each batch's first line in full: this test reads them
    )

    def snapshot() -> Stats:
        stats = middleware.stats()
        snapshots.append(stats)
        return stats

    caplog.set_level(logging.INFO, logger=LOGGER)
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/")).text == "ok"
        await until(lambda: snapshot().shed >= 7)
        stats = snapshot()
        assert (stats.running, stats.pending, stats.collected, stats.shed) == (1, 1, 1, 7)
        # The seven are shed together, for one reason: the first line in full, the other six
        # counted in one summary (written by the aggregator's timer, a loop turn later).
        await until(lambda: len(task_lines(caplog, "blocked", "shed")) == 2)
        full, summary = task_lines(caplog, "blocked", "shed")
        assert "1 task(s) already waited for room, the most allowed (max_pending=1)" in full
        assert summary.startswith("... and 6 more tasks of ")
        # The one waiting for room: the queue stays full past its overflow_timeout: shed.
        await until(lambda: snapshot().shed == 8)
        [timed_out] = task_lines(caplog, "blocked", "shed", "overflow_timeout=1.0s")
        assert "the queue stayed full (max_pending=1)" in timed_out
        release.set()
        assert await middleware.drain(timeout=5)
        stats = snapshot()
    assert (stats.added, stats.succeeded, stats.shed) == (10, 2, 8)
    for each in snapshots:
        assert_identity(each)


# -- 9. drain() under steady load -------------------------------------------------------------


async def test_drain_returns_under_steady_load_once_earlier_tasks_are_done() -> None:
    done: set[int] = set()
    added = 0

    async def short(number: int) -> None:
        await anyio.sleep(0.02)
        done.add(number)

    async def endpoint(request: Request) -> Response:
        nonlocal added
        request.state.after_response.add(short, added)
        added += 1
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(Starlette(routes=[Route("/", endpoint)]))
    load_running = True

    async def load(client: httpx.AsyncClient) -> None:
        while load_running:
            await client.get("/")

    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        async with anyio.create_task_group() as task_group:
            for _ in range(4):  # enough clients that some task is always outstanding
                task_group.start_soon(load, client)
            await until(lambda: added >= 20)
            added_before = middleware.stats().added
            assert await middleware.drain(timeout=5)
            outstanding_at_return = middleware.stats().added - middleware.stats().finished
            added_at_return = added
            assert done >= set(range(added_before))
            await until(lambda: added > added_at_return)  # the load went on
            load_running = False
        assert await middleware.drain(timeout=5)
    assert outstanding_at_return > 0  # it did not wait for the load to stop


# -- 10. Late adds ----------------------------------------------------------------------------


@pytest.mark.parametrize("run_on_error", [False, True], ids=["discarded", "run_on_error"])
async def test_a_late_add_from_a_failed_request_follows_run_on_error(
    run_on_error: bool, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []
    collectors: list[Collector] = []

    async def follow_up() -> None:
        ran.append("follow-up")

    async def endpoint(request: Request) -> Response:
        collectors.append(request.state.after_response)
        return PlainTextResponse("failed", status_code=500)

    middleware = AfterResponseMiddleware(Starlette(routes=[Route("/", endpoint)]))
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/")).status_code == 500
        await until(lambda: collectors[0].handed_over)  # the request's call is over
        collectors[0].options(run_on_error=run_on_error).add(follow_up)
        assert await middleware.drain(timeout=5)
    stats = middleware.stats()
    assert_identity(stats)
    if run_on_error:
        assert (ran, stats.succeeded, stats.discarded) == (["follow-up"], 1, 0)
        assert task_lines(caplog, "follow_up", "added after its response was complete")
    else:
        assert (ran, stats.succeeded, stats.discarded) == ([], 0, 1)
        [line] = task_lines(caplog, "follow_up", "discarded")
        assert "the response status was 500 (it was added after the response)" in line


async def test_a_late_add_from_a_stray_asyncio_task_runs_with_a_debug_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []
    response_sent = anyio.Event()
    strays: set[asyncio.Task[None]] = set()

    async def follow_up() -> None:
        ran.append("follow-up")

    async def stray() -> None:
        await response_sent.wait()
        current().add(follow_up)  # the request's collector, from the copied context

    async def endpoint(request: Request) -> Response:
        task = asyncio.get_running_loop().create_task(stray())
        strays.add(task)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(Starlette(routes=[Route("/", endpoint)]))
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/")).text == "ok"
        response_sent.set()
        [task] = strays
        await task
        assert await middleware.drain(timeout=5)
    assert ran == ["follow-up"]
    stats = middleware.stats()
    assert_identity(stats)
    assert (stats.added, stats.succeeded) == (1, 1)
    [line] = [r for r in caplog.records if str(getattr(r, "task_name", "")).endswith(".follow_up")]
    assert line.levelno == logging.DEBUG
    assert "added after its response was complete; submitted now" in line.getMessage()


async def test_a_late_add_from_a_plain_thread_runs() -> None:
    ran: list[str] = []
    response_sent = threading.Event()
    threads: list[threading.Thread] = []

    def follow_up() -> None:
        ran.append("follow-up")

    async def endpoint(request: Request) -> Response:
        collector = request.state.after_response

        def later() -> None:
            response_sent.wait(5)
            collector.add(follow_up)

        threads.append(threading.Thread(target=later))
        threads[0].start()
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(Starlette(routes=[Route("/", endpoint)]))
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/")).text == "ok"
        response_sent.set()
        await anyio.to_thread.run_sync(threads[0].join, 5)
        await until(lambda: middleware.stats().added == 1)
        assert await middleware.drain(timeout=5)
    stats = middleware.stats()
    assert_identity(stats)
    assert (ran, stats.succeeded, stats.shed) == (["follow-up"], 1, 0)


async def test_a_task_raising_cancelled_error_itself_is_logged_as_failed_saying_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    letters: list[DeadLetter] = []

    async def gives_up() -> None:
        raise asyncio.CancelledError

    async def endpoint(request: Request) -> Response:
        request.state.after_response.add(gives_up)
        return PlainTextResponse("ok")

    middleware = AfterResponseMiddleware(
        Starlette(routes=[Route("/", endpoint)]),
        on_dead_letter=letters.append,
        log_interval=1e-9,  # each failure's line in full: this test reads both
    )
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/")).text == "ok"
        assert await middleware.drain(timeout=5)
        assert (await client.get("/")).text == "ok"  # the server is unaffected
        assert await middleware.drain(timeout=5)
    stats = middleware.stats()
    assert_identity(stats)
    assert (stats.failed, stats.abandoned) == (2, 0)
    assert [letter.outcome for letter in letters] == ["failed", "failed"]
    lines = task_lines(caplog, "gives_up")
    assert len(lines) == 2
    for line in lines:
        assert "failed after 1 attempt(s) (it raised CancelledError itself" in line
        assert "ASGI call was cancelled" not in line


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() tells it apart")
def test_a_task_cancelled_without_a_lifespan_shutdown_is_abandoned_saying_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The event loop closes (``asyncio.run()`` returns) while a task runs and no lifespan
    shutdown came: the loop cancels the task, which is abandoned, not failed."""
    letters: list[DeadLetter] = []
    delivered = threading.Event()

    def hook(letter: DeadLetter) -> None:
        letters.append(letter)
        delivered.set()

    async def blocked() -> None:
        await asyncio.sleep(3600)

    middleware = AfterResponseMiddleware(
        app_adding(blocked), on_dead_letter=hook, shutdown_timeout=0.1
    )

    async def serve_without_shutdown() -> None:
        started = asyncio.Event()
        messages = [{"type": "lifespan.startup"}]

        async def receive() -> Message:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # no shutdown ever comes
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                started.set()

        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        lifespan_call = asyncio.get_running_loop().create_task(middleware(scope, receive, send))
        await started.wait()
        await call(middleware, http_scope())
        await until(lambda: middleware.stats().running == 1)
        assert not lifespan_call.done()

    caplog.set_level(logging.INFO, logger=LOGGER)
    asyncio.run(serve_without_shutdown())
    assert delivered.wait(5)
    stats = middleware.stats()
    assert_identity(stats)
    assert (stats.running, stats.failed, stats.abandoned) == (0, 0, 1)
    assert [letter.outcome for letter in letters] == ["abandoned"]
    [line] = task_lines(caplog, "blocked")
    assert " abandoned: it was cancelled from outside after-response" in line


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() tells it apart")
async def test_a_task_cancelled_by_other_code_is_abandoned_not_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    letters: list[DeadLetter] = []

    async def cancelled_by_a_stranger() -> None:
        me = asyncio.current_task()
        assert me is not None
        asyncio.get_running_loop().call_soon(me.cancel)  # as a library might
        await asyncio.sleep(3600)

    middleware = AfterResponseMiddleware(
        app_adding(cancelled_by_a_stranger), on_dead_letter=letters.append
    )
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with serve_uvicorn(middleware) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/")).text == "ok"
        assert await middleware.drain(timeout=5)
    stats = middleware.stats()
    assert_identity(stats)
    assert (stats.failed, stats.abandoned) == (0, 1)
    assert [letter.outcome for letter in letters] == ["abandoned"]
    [line] = task_lines(caplog, "cancelled_by_a_stranger")
    assert " abandoned: it was cancelled from outside after-response while it ran " in line
