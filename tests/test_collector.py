"""The collector's API: clear errors at add() time, options, current(), isolation."""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
from typing import Any

import anyio
import anyio.to_thread
import pytest
from opentelemetry import metrics, trace
from starlette.types import Receive, Scope, Send

import after_response
from after_response import (
    AfterResponseMiddleware,
    Collector,
    NoActiveRequestError,
    Retry,
    current,
    side_effect,
)

from .asgi import call, http_scope, lifespan

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """These tests drive the ASGI app directly, so they run on trio too (anyio task groups
    and cancel scopes there, native asyncio tasks and one deadline timer on asyncio)."""
    return str(request.param)


def app_running(handler: Any) -> Any:
    """A bare ASGI app that calls ``handler(collector)`` and answers 200."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan here")
        await handler(current())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def send_email(to: str, code: str, *, subject: str = "Your code") -> None:
    """A side effect with a signature to check arguments against."""


async def test_current_outside_a_request_raises_a_lookup_error_that_says_what_to_do() -> None:
    with pytest.raises(LookupError, match="Wrap your ASGI app") as info:
        current()
    assert isinstance(info.value, NoActiveRequestError)
    assert "AfterResponseMiddleware" in str(info.value)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (42, "add\\(\\) expects a callable, got int; pass the function and its arguments"),
        ("send_email", "expects a callable, got str"),
    ],
)
async def test_add_rejects_non_callables(fn: object, message: str) -> None:
    errors: list[Exception] = []

    async def handler(collector: Collector) -> None:
        try:
            collector.add(fn)  # type: ignore[arg-type]
        except TypeError as exc:
            errors.append(exc)

    await call(AfterResponseMiddleware(app_running(handler)), http_scope())
    [error] = errors
    assert isinstance(error, TypeError)
    import re

    assert re.search(message, str(error))


async def test_add_rejects_a_coroutine_object_and_names_the_fix() -> None:
    errors: list[Exception] = []

    async def handler(collector: Collector) -> None:
        with pytest.raises(TypeError) as info:
            collector.add(send_email("a@example.com", "123456"))  # type: ignore[arg-type]
        errors.append(info.value)

    with warnings_as_errors():
        await call(AfterResponseMiddleware(app_running(handler)), http_scope())
    message = str(errors[0])
    assert "got a coroutine object" in message
    assert "add(send_email, *args) instead of add(send_email(*args))" in message


async def test_add_rejects_other_awaitables() -> None:
    async def handler(collector: Collector) -> None:
        class Awaitable:
            def __await__(self) -> Any:
                yield

        with pytest.raises(TypeError, match="got an awaitable Awaitable"):
            collector.add(Awaitable())  # type: ignore[arg-type]

    await call(AfterResponseMiddleware(app_running(handler)), http_scope())


@pytest.mark.parametrize(
    ("args", "kwargs", "missing"),
    [
        (("a@example.com",), {}, "missing a required argument: 'code'"),
        (("a@example.com", "1", "extra"), {}, "too many positional arguments"),
        (("a@example.com", "1"), {"subjekt": "x"}, "unexpected keyword argument 'subjekt'"),
    ],
)
async def test_add_checks_arguments_against_the_signature_without_echoing_values(
    args: tuple[Any, ...], kwargs: dict[str, Any], missing: str
) -> None:
    async def handler(collector: Collector) -> None:
        with pytest.raises(TypeError) as info:
            collector.add(send_email, *args, **kwargs)
        message = str(info.value)
        assert missing in message
        assert "add(send_email, ...)" in message
        assert "a@example.com" not in message

    await call(AfterResponseMiddleware(app_running(handler)), http_scope())


async def test_bound_methods_partials_and_builtins_are_accepted() -> None:
    ran: list[str] = []

    class Mailer:
        async def send(self, to: str) -> None:
            ran.append(f"method {to}")

        def __call__(self, to: str) -> None:
            ran.append(f"callable object {to}")

    async def handler(collector: Collector) -> None:
        collector.add(Mailer().send, "x")
        collector.add(Mailer(), "y")
        collector.add(functools.partial(send_email, "a@example.com"), "1")
        collector.add(print, end="")  # a builtin: no signature to check against
        with pytest.raises(TypeError, match="missing a required argument"):
            collector.add(Mailer().send)

    middleware = AfterResponseMiddleware(app_running(handler))
    async with lifespan(middleware):
        await call(middleware, http_scope())
        assert await middleware.drain(timeout=5)
    assert sorted(ran) == ["callable object y", "method x"]
    assert middleware.stats().succeeded == 4


@pytest.mark.parametrize(
    "option", [p for p in inspect.signature(Collector.options).parameters if p != "self"]
)
async def test_every_option_given_to_add_points_to_options(option: str) -> None:
    async def handler(collector: Collector) -> None:
        with pytest.raises(TypeError, match=rf"has no parameter '{option}'; task options go"):
            collector.add(send_email, "to", "code", **{option: 1})

    await call(AfterResponseMiddleware(app_running(handler)), http_scope())


async def test_options_do_not_collide_with_the_functions_own_keyword_arguments() -> None:
    received: dict[str, Any] = {}

    async def notify(*, name: str, timeout: int, retry: bool) -> None:
        received.update(name=name, timeout=timeout, retry=retry)

    async def handler(collector: Collector) -> None:
        collector.options(name="notify", timeout=2).add(notify, name="n", timeout=7, retry=True)

    middleware = AfterResponseMiddleware(app_running(handler))
    async with lifespan(middleware):
        await call(middleware, http_scope())
        assert await middleware.drain(timeout=5)
    assert received == {"name": "n", "timeout": 7, "retry": True}


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"timeout": 0}, ValueError, "timeout must be a positive number of seconds or None"),
        (
            {"timeout": "5"},
            TypeError,
            "timeout must be a positive number of seconds or None, got str",
        ),
        ({"name": ""}, TypeError, "name must be a non-empty string"),
        ({"retry": 3}, TypeError, "retry must be a Retry"),
        ({"run_on_error": "yes"}, TypeError, "run_on_error must be True or False"),
        ({"max_concurrency": "2"}, TypeError, "max_concurrency must be .* got str$"),
        ({"max_concurrency": True}, TypeError, "max_concurrency must be .* got bool$"),
        ({"max_concurrency": 0}, ValueError, "max_concurrency must be .* got 0$"),
    ],
)
async def test_bad_options_fail_at_the_call_with_a_clear_message(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    async def handler(collector: Collector) -> None:
        with pytest.raises(error, match=message):
            collector.options(**options)
        with pytest.raises(error, match=message):
            side_effect(**options)

    await call(AfterResponseMiddleware(app_running(handler)), http_scope())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"attempts": 0}, ValueError, "attempts=0\\) must be at least 1"),
        ({"attempts": 2.5}, TypeError, "attempts=...\\) must be an int"),
        ({"backoff": -1}, ValueError, "backoff=-1\\) must be a finite number >= 0"),
        (
            {"backoff": "1"},
            TypeError,
            "backoff=...\\) must be a finite number >= 0 seconds, got str",
        ),
        ({"max_backoff": float("inf")}, ValueError, "max_backoff=inf\\) must be a finite"),
        ({"multiplier": "2"}, TypeError, "multiplier=...\\) must be a number >= 1, got str"),
        ({"jitter": None}, TypeError, "jitter=...\\) must be a number between 0.0 and 1.0"),
        ({"attempts": "3"}, TypeError, "attempts=...\\) must be an int, got str"),
        ({"multiplier": 0.5}, ValueError, "multiplier=0.5\\) must be a number >= 1"),
        ({"jitter": 2}, ValueError, "jitter=2\\) must be between 0.0 and 1.0"),
        ({"retry_on": (ValueError, "x")}, TypeError, "or a tuple of exception types, got str"),
        ({"retry_on": [ValueError, int]}, TypeError, "got the class int among them"),
        ({"retry_on": "ValueError"}, TypeError, "or a tuple of exception types, got str;"),
        ({"retry_on": 5}, TypeError, "or a tuple of exception types, got int;"),
        ({"retry_on": ()}, ValueError, r"is empty.*retry=None or Retry\(attempts=1\)"),
        ({"retry_on": []}, ValueError, r"is empty.*retry=None or Retry\(attempts=1\)"),
    ],
)
def test_retry_rejects_bad_policies(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Retry(**kwargs)


def test_retry_delay_grows_exponentially_up_to_the_cap_and_jitter_only_shortens_it() -> None:
    policy = Retry(attempts=10, backoff=1, multiplier=2, max_backoff=5, jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 5, 5]
    jittered = Retry(attempts=10, backoff=1, multiplier=2, max_backoff=5, jitter=0.5)
    for _ in range(100):
        assert 2 <= jittered.delay(3) <= 4
    assert Retry(retry_on=ValueError).retry_on == (ValueError,)


@pytest.mark.parametrize(
    "retry_on", [[KeyError, OSError], {KeyError, OSError}, (KeyError, OSError)]
)
def test_retry_on_takes_any_collection_of_exception_types(retry_on: Any) -> None:
    policy = Retry(retry_on=retry_on)
    assert isinstance(policy.retry_on, tuple)
    assert set(policy.retry_on) == {KeyError, OSError}
    assert policy.should_retry(1, ConnectionError())  # an OSError
    assert not policy.should_retry(1, ValueError())


def test_side_effect_rejects_non_callables() -> None:
    with pytest.raises(TypeError, match="decorates a function"):
        side_effect()(42)  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_concurrency": 0}, ValueError, "max_concurrency must be at least 1, got 0"),
        ({"max_concurrency": 1.5}, TypeError, "max_concurrency must be an int"),
        ({"max_pending": -1}, ValueError, "max_pending must be at least 0"),
        ({"max_threads": True}, TypeError, "max_threads must be an int"),
        ({"task_timeout": -1}, ValueError, "task_timeout must be a positive number"),
        ({"shutdown_timeout": float("inf")}, ValueError, "shutdown_timeout must be"),
        ({"overflow_timeout": 0}, ValueError, "overflow_timeout must be"),
        ({"task_timeout": "5"}, TypeError, "task_timeout must be .* or None, got str$"),
        ({"max_pending": 1.0}, TypeError, "max_pending must be an int, got float$"),
        ({"overflow": 5}, TypeError, "overflow must be one of 'shed', .* got int$"),
        (
            {"log_interval": 0},
            ValueError,
            "log_interval must be a positive number of seconds, got 0",
        ),
        (
            {"log_interval": None},
            TypeError,
            "log_interval must be a positive number of seconds, got None",
        ),
        ({"retry": 3}, TypeError, "retry must be a Retry"),
        ({"run_on_error": 1}, TypeError, "run_on_error must be True or False"),
        ({"on_dead_letter": "log"}, TypeError, "on_dead_letter must be callable"),
        ({"state_key": ""}, TypeError, "state_key must be a non-empty string"),
        ({"tracer_provider": "x"}, TypeError, r"an OpenTelemetry TracerProvider .* got str$"),
        ({"meter_provider": 5}, TypeError, r"an OpenTelemetry MeterProvider .* got int$"),
        ({"store": "file.sqlite3"}, TypeError, r"got str: .* store=SQLiteStore\(path\)"),
        ({"store": object()}, TypeError, r"got object; for example store=SQLiteStore\("),
        ({"on_dead_letter": lambda: None}, TypeError, "with one argument.*too many positional"),
        ({"on_dead_letter": lambda letter, extra: None}, TypeError, "argument: 'extra'"),
    ],
)
def test_middleware_rejects_bad_settings(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None: ...

    with pytest.raises(error, match=message):
        AfterResponseMiddleware(app, **kwargs)


@pytest.mark.parametrize("option", ["tracer_provider", "meter_provider", "store"])
def test_a_wrong_object_is_named_by_its_type_never_by_its_value(option: str) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None: ...

    with pytest.raises(TypeError, match=option) as info:
        AfterResponseMiddleware(app, **{option: "postgres://admin:SECRET@db"})
    assert "SECRET" not in str(info.value)


def test_providers_and_hooks_are_checked_by_what_they_can_do_not_by_their_class() -> None:
    class TracerProvider:  # a user's own wrapper, not the SDK's class
        def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
            return trace.NoOpTracer()

    class MeterProvider:
        def get_meter(self, *args: Any, **kwargs: Any) -> Any:
            return metrics.NoOpMeter("wrapped")

    class Hook:
        def __call__(self, letter: Any, extra: Any = None) -> None: ...

    async def app(scope: Scope, receive: Receive, send: Send) -> None: ...

    AfterResponseMiddleware(
        app, tracer_provider=TracerProvider(), meter_provider=MeterProvider(), on_dead_letter=Hook()
    )
    for hook in ([].append, print, max):  # max: a builtin whose signature cannot be read
        AfterResponseMiddleware(app, on_dead_letter=hook)


def test_middleware_without_an_app_says_so() -> None:
    with pytest.raises(
        TypeError, match=r"AfterResponseMiddleware\(app\) wraps an ASGI app.*NoneType"
    ):
        AfterResponseMiddleware(None)  # type: ignore[arg-type]


async def test_drain_rejects_a_bad_timeout() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None: ...

    with pytest.raises(ValueError, match="timeout must be"):
        await AfterResponseMiddleware(app).drain(timeout=-1)


async def test_each_request_gets_its_own_collector_and_state_dict() -> None:
    seen: list[tuple[Collector, dict[str, Any]]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope["state"]["after_response"], scope["state"]))
        assert scope["state"]["after_response"] is current()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = AfterResponseMiddleware(app)
    shared_state = {"db": "pool"}
    await call(middleware, http_scope(state=shared_state))
    await call(middleware, http_scope(state=shared_state))
    (first, first_state), (second, second_state) = seen
    assert first is not second
    assert first_state is not second_state
    assert first_state["db"] == "pool"
    assert shared_state == {"db": "pool"}  # the server's dict is left untouched


async def test_tasks_see_context_variables_as_they_were_at_add_time() -> None:
    user: contextvars.ContextVar[str] = contextvars.ContextVar("user")
    seen: list[str] = []

    async def async_effect() -> None:
        seen.append(f"async {user.get()}")
        user.set("changed by the task")

    def sync_effect() -> None:
        seen.append(f"sync {user.get()}")

    async def handler(collector: Collector) -> None:
        user.set("alice")
        collector.add(async_effect)
        user.set("bob")
        collector.add(sync_effect)
        collector.add(async_effect)
        user.set("carol")  # after the last add: no task sees it

    middleware = AfterResponseMiddleware(app_running(handler))
    async with lifespan(middleware):
        await call(middleware, http_scope())
        assert await middleware.drain(timeout=5)
    assert sorted(seen) == ["async alice", "async bob", "sync bob"]


async def test_side_effects_can_add_follow_up_side_effects_from_async_and_sync_code() -> None:
    ran: list[str] = []

    async def receipt() -> None:
        ran.append("receipt")

    async def charge() -> None:
        ran.append("charge")
        current().add(receipt)

    def audit() -> None:
        ran.append(f"audit in thread {threading.current_thread() is not threading.main_thread()}")
        current().add(receipt)

    async def handler(collector: Collector) -> None:
        collector.add(charge)
        collector.add(audit)

    for with_lifespan in (True, False):
        ran.clear()
        middleware = AfterResponseMiddleware(app_running(handler))
        if with_lifespan:
            async with lifespan(middleware):
                await call(middleware, http_scope())
                assert await middleware.drain(timeout=5)
        else:
            await call(middleware, http_scope())  # no lifespan: the call runs them itself
        assert sorted(ran) == ["audit in thread True", "charge", "receipt", "receipt"]
        assert middleware.stats().succeeded == 4


async def test_sync_side_effect_returning_a_coroutine_is_awaited() -> None:
    ran: list[str] = []

    async def effect() -> None:
        ran.append("awaited")

    async def handler(collector: Collector) -> None:
        collector.add(lambda: effect())

    middleware = AfterResponseMiddleware(app_running(handler))
    async with lifespan(middleware):
        await call(middleware, http_scope())
        assert await middleware.drain(timeout=5)
    assert ran == ["awaited"]


async def test_task_names_default_to_the_qualified_name_and_can_be_set() -> None:
    names: list[str] = []

    @side_effect(name="welcome_email")
    async def decorated() -> None: ...

    async def handler(collector: Collector) -> None:
        collector.add(decorated)
        collector.options(name="override").add(decorated)
        collector.add(functools.partial(send_email, "a", "b"))
        names.extend(repr(collector).split("[", 1)[1].rstrip("]>").split(", "))

    await call(AfterResponseMiddleware(app_running(handler)), http_scope())
    assert names == ["welcome_email", "override", "send_email"]


async def test_collector_repr_and_len_show_names_not_arguments() -> None:
    async def handler(collector: Collector) -> None:
        collector.add(send_email, "secret@example.com", "999999")
        assert len(collector) == 1
        assert "send_email" in repr(collector)
        assert "secret@example.com" not in repr(collector)

    await call(AfterResponseMiddleware(app_running(handler)), http_scope())


def test_public_api_is_exported() -> None:
    for name in after_response.__all__:
        assert hasattr(after_response, name), name
    assert after_response.__version__


class warnings_as_errors:
    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)


async def test_drain_returns_false_when_tasks_outlast_the_timeout() -> None:
    release = anyio.Event()

    async def blocked() -> None:
        await release.wait()

    async def handler(collector: Collector) -> None:
        collector.add(blocked)

    middleware = AfterResponseMiddleware(app_running(handler))
    async with lifespan(middleware):
        await call(middleware, http_scope())
        assert await middleware.drain(timeout=0.01) is False
        release.set()
        assert await middleware.drain(timeout=5) is True


async def test_shutdown_sheds_tasks_of_requests_still_waiting_for_room() -> None:
    started = anyio.Event()

    async def blocked() -> None:
        started.set()
        await anyio.sleep_forever()

    async def handler(collector: Collector) -> None:
        collector.add(blocked)

    middleware = AfterResponseMiddleware(
        app_running(handler),
        max_concurrency=1,
        max_pending=1,
        overflow_timeout=None,
        shutdown_timeout=0.05,
    )
    async with anyio.create_task_group() as tg, lifespan(middleware):
        await call(middleware, http_scope())  # runs
        await started.wait()
        await call(middleware, http_scope())  # queued
        tg.start_soon(call, middleware, http_scope())  # waits for room, indefinitely
        await anyio.wait_all_tasks_blocked()
        assert middleware.stats().collected == 1
    stats = middleware.stats()
    assert (stats.abandoned, stats.shed, stats.collected) == (2, 1, 0)


async def test_task_added_after_its_request_ended_without_executor_is_shed_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kept: list[Collector] = []

    async def handler(collector: Collector) -> None:
        kept.append(collector)

    middleware = AfterResponseMiddleware(app_running(handler))  # no lifespan: no executor
    await call(middleware, http_scope())
    kept[0].add(send_email, "a@example.com", "1")
    assert middleware.stats().shed == 1
    assert "added after its request had ended" in caplog.text
    assert "a@example.com" not in caplog.text


async def test_task_added_from_a_foreign_thread_after_hand_over_runs_like_any_late_add() -> None:
    kept: list[Collector] = []
    ran = anyio.Event()
    sent: list[str] = []

    async def effect() -> None:
        ran.set()

    async def send_email(to: str, code: str) -> None:
        sent.append(to)

    async def handler(collector: Collector) -> None:
        kept.append(collector)
        collector.add(effect)

    middleware = AfterResponseMiddleware(app_running(handler))
    async with lifespan(middleware):
        await call(middleware, http_scope())
        await ran.wait()
        # A thread the event loop knows nothing about (not an anyio worker thread).
        thread = threading.Thread(target=kept[0].add, args=(send_email, "a@example.com", "1"))
        thread.start()
        await anyio.to_thread.run_sync(thread.join)
        assert await middleware.drain(timeout=5)
    assert sent == ["a@example.com"]
    assert middleware.stats().succeeded == 2


async def test_without_lifespan_a_cancelled_request_call_abandons_its_running_tasks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = anyio.Event()
    finished: list[str] = []

    async def slow_effect() -> None:
        started.set()
        await anyio.sleep_forever()
        finished.append("slow")  # pragma: no cover - it is cancelled

    async def handler(collector: Collector) -> None:
        collector.add(slow_effect)

    middleware = AfterResponseMiddleware(app_running(handler))
    async with anyio.create_task_group() as task_group:
        # No lifespan: the request's own call runs its task, and is cancelled meanwhile
        # (as a server does to a call that outlives its graceful shutdown).
        task_group.start_soon(call, middleware, http_scope())
        await started.wait()
        task_group.cancel_scope.cancel()
    stats = middleware.stats()
    assert (stats.abandoned, stats.running, finished) == (1, 0, [])
    assert "slow_effect of GET / abandoned: its request's ASGI call was cancelled" in caplog.text
    assert await middleware.drain(timeout=1)


async def test_current_task_works_in_async_sync_and_child_code_and_not_after_the_task(
    anyio_backend: str,
) -> None:
    # On trio the tasks run in an anyio task group, on asyncio in the executor's own task set:
    # both give each side effect its own id, in its thread and in tasks it starts, and none
    # outside it.
    seen: list[tuple[str, str]] = []

    async def child(label: str) -> None:
        seen.append((label, after_response.current_task().id))

    async def charge() -> None:
        seen.append(("charge", after_response.current_task().id))
        async with anyio.create_task_group() as group:
            group.start_soon(child, "charge's child")

    def receipt() -> None:  # a worker thread
        seen.append(("receipt", after_response.current_task().id))

    async def handler(collector: Collector) -> None:
        collector.add(charge)
        collector.add(receipt)

    middleware = AfterResponseMiddleware(app_running(handler))
    async with lifespan(middleware):
        await call(middleware, http_scope())
        assert await middleware.drain(timeout=5)
        with pytest.raises(after_response.NoCurrentTaskError):
            after_response.current_task()
    ids = dict(seen)
    assert sorted(ids) == ["charge", "charge's child", "receipt"]
    assert ids["charge"] == ids["charge's child"] != ids["receipt"]
