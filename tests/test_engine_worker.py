"""The engine worker's generic runner (``after_response._worker.WorkerRunner``) and the message
body it reads: the in-process semantics, run from a message (the engine suites run it in real
Celery and taskiq workers; here each rule is checked directly)."""

from __future__ import annotations

import contextvars
import logging
import threading
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from after_response import AfterResponseMiddleware, DeadLetter, SQLiteStore
from after_response._durable import trace_carrier
from after_response._engine import BODY_VERSION, BadMessageError, Engine, decode, encode
from after_response._store import StoredTask
from after_response._task import Outcome
from after_response._worker import WorkerRunner

from . import worker_effects
from .test_metrics import histogram_counts, metrics_by_name, sums

pytestmark = pytest.mark.anyio


def body(
    target: str,
    *args: Any,
    timeout: float = 5.0,
    attempts: int = 1,
    limits: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """The message body of ``tests.worker_effects.<target>(*args, **kwargs)``, with its
    options (``limits`` as the store keeps them: ``max_concurrency`` and ``rate``)."""
    row = StoredTask(
        id=f"id-{target}",
        name=target.rpartition(":")[2],
        target=f"tests.worker_effects:{target}",
        args=list(args),
        kwargs=kwargs,
        options={
            "timeout": timeout,
            "retry": {"attempts": attempts, "backoff": 0.001},
            "limits": limits,
        },
        request_method="POST",
        request_path="/signup",
    )
    return encode(row, {})


@pytest.fixture(autouse=True)
def seen() -> list[tuple[str, str, int, bool]]:
    worker_effects.SEEN.clear()
    return worker_effects.SEEN


async def test_a_message_runs_its_side_effect_with_its_id(seen: list[Any]) -> None:
    runner = WorkerRunner("test")
    outcome = await runner.run(body("greet", "ada", greeting="hi"))
    assert outcome is Outcome.SUCCEEDED
    assert seen == [("greet hi ada", "id-greet", 1, False)]
    stats = runner.stats()
    assert (stats.received, stats.succeeded, stats.running) == (1, 1, 0)


async def test_a_worker_reports_the_same_metrics_as_the_web_process(seen: list[Any]) -> None:
    reader = InMemoryMetricReader()
    runner = WorkerRunner("test", meter_provider=MeterProvider(metric_readers=[reader]))
    running_during: list[dict[tuple[Any, ...], int]] = []
    worker_effects.PROBES[:] = [
        lambda: running_during.append(sums(metrics_by_name(reader)["after_response.task.running"]))
    ]
    try:
        assert await runner.run(body("probe")) is Outcome.SUCCEEDED
    finally:
        worker_effects.PROBES.clear()
    assert await runner.run(body("flaky", 5, attempts=2)) is Outcome.FAILED
    assert running_during == [{("probe",): 1}]
    metrics = metrics_by_name(reader)
    assert sums(metrics["after_response.task.running"]) == {}  # back to zero
    assert sums(metrics["after_response.task.finished"]) == {
        ("probe", "succeeded"): 1,
        ("flaky", "failed"): 1,
    }
    assert sums(metrics["after_response.task.retries"]) == {("flaky",): 1}
    assert histogram_counts(metrics["after_response.task.duration"]) == {
        ("probe", "succeeded"): 1,
        ("flaky", "retry"): 1,
        ("flaky", "failed"): 1,
    }


async def test_retries_follow_the_policy_within_one_delivery(
    seen: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    runner = WorkerRunner("test")
    assert await runner.run(body("flaky", 2, attempts=3)) is Outcome.SUCCEEDED
    assert [attempt for _, _, attempt, _ in seen] == [1, 2, 3]
    assert runner.stats().retried == 2
    assert "attempt 1/3 failed (RuntimeError); retrying" in caplog.text


async def test_the_last_failure_is_a_dead_letter_without_the_arguments(
    caplog: pytest.LogCaptureFixture,
) -> None:
    letters: list[DeadLetter] = []
    delivered = threading.Event()

    def hook(letter: DeadLetter) -> None:
        letters.append(letter)
        delivered.set()

    runner = WorkerRunner("test", on_dead_letter=hook)
    assert await runner.run(body("broken", "s3cr3t-token")) is Outcome.FAILED
    assert delivered.wait(5)
    assert letters[0].task_id == "id-broken"
    assert (letters[0].outcome, letters[0].attempts) == ("failed", 1)
    assert runner.stats().failed == 1
    assert "failed after 1 attempt(s)" in caplog.text
    assert "s3cr3t-token" not in caplog.text


async def test_a_burst_of_failures_is_one_traceback_and_a_summary_written_at_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A downstream is down and every side effect fails in the worker: one line in full
    (traceback included) per task name and error, the rest counted; the count is written
    when the worker stops, before its interval ends."""
    runner = WorkerRunner("test", log_interval=3600)
    for _ in range(12):
        assert await runner.run(body("broken", "s3cr3t-token")) is Outcome.FAILED
    failures = [r for r in caplog.records if "failed after 1 attempt(s)" in r.getMessage()]
    assert len(failures) == 1
    assert "ValueError" in (failures[0].exc_text or "")  # with its traceback
    assert "more tasks of broken" not in caplog.text
    runner.shutdown()
    [summary] = [r for r in caplog.records if "more tasks of broken" in r.getMessage()]
    assert summary.getMessage().startswith("... and 11 more tasks of broken in the last ")
    assert summary.getMessage().endswith(": failed (ValueError)")
    assert (summary.levelno, summary.aggregated_count) == (logging.ERROR, 11)  # type: ignore[attr-defined]
    assert runner.stats().failed == 12
    assert "s3cr3t-token" not in caplog.text


async def test_a_summary_of_retried_attempts_counts_attempts_not_tasks(
    caplog: pytest.LogCaptureFixture, seen: list[Any]
) -> None:
    runner = WorkerRunner("test", log_interval=3600)
    # One task, four failed attempts before its fifth succeeds: one line, three counted.
    assert await runner.run(body("flaky", 4, attempts=5)) is Outcome.SUCCEEDED
    runner.shutdown()
    [summary] = [r for r in caplog.records if hasattr(r, "aggregated_count")]
    assert summary.getMessage().startswith("... and 3 more attempts of flaky in the last ")
    assert summary.getMessage().endswith(": failed (RuntimeError); retrying")
    assert summary.task_name == "flaky"  # type: ignore[attr-defined]


async def test_dead_letters_a_stuck_hook_has_not_started_on_are_given_up_at_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    in_hook = threading.Event()
    release = threading.Event()

    def stuck_hook(letter: DeadLetter) -> None:
        in_hook.set()
        release.wait(30)

    runner = WorkerRunner("test", on_dead_letter=stuck_hook)
    try:
        for _ in range(3):
            assert await runner.run(body("broken", "s3cr3t-token")) is Outcome.FAILED
        assert in_hook.wait(5)
        runner.shutdown(timeout=0.1)
    finally:
        release.set()
    assert runner.stats().dead_letters_lost == 2
    [line] = [r for r in caplog.records if "never reached on_dead_letter" in r.getMessage()]
    assert line.getMessage().startswith(
        "after-response: 2 dead letter(s) never reached on_dead_letter: the hook was still "
        "busy when the test worker stopped (broken: 2)."
    )
    assert line.dead_letters_lost == {"broken": 2}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("interval", "error", "message"),
    [
        (0, ValueError, "log_interval must be a positive number of seconds, got 0"),
        (None, TypeError, "log_interval must be a positive number of seconds, got None"),
    ],
)
def test_a_bad_log_interval_is_refused(interval: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        WorkerRunner("test", log_interval=interval)


async def test_a_timeout_ends_the_attempt() -> None:
    runner = WorkerRunner("test")
    assert await runner.run(body("sleepy", 0.5, timeout=0.05)) is Outcome.TIMED_OUT
    assert runner.stats().timed_out == 1


async def test_a_redelivery_is_marked_recovered(seen: list[Any]) -> None:
    runner = WorkerRunner("test")
    await runner.run(body("greet", "ada"), redelivered=True)
    assert seen[0][3] is True
    assert runner.stats().redelivered == 1


async def test_what_cannot_run_is_logged_by_name_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    letters: list[DeadLetter] = []
    delivered = threading.Event()

    def hook(letter: DeadLetter) -> None:
        letters.append(letter)
        delivered.set()

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    runner = WorkerRunner("test", on_dead_letter=hook, tracer_provider=provider)
    missing = body("greet", "ada")
    missing["target"] = "tests.worker_effects:gone"
    assert await runner.run(missing) is Outcome.FAILED
    assert "tests.worker_effects:gone cannot be imported here" in caplog.text
    # The message is acknowledged: the dead-letter hook and the span are what is left of it.
    assert delivered.wait(5)
    [letter] = letters
    assert (letter.task_name, letter.task_id, letter.outcome) == ("greet", "id-greet", "failed")
    assert isinstance(letter.exception, ImportError)
    [span] = exporter.get_finished_spans()
    assert span.attributes is not None
    assert span.attributes["after_response.task.outcome"] == "failed"
    assert await runner.run({"not": "ours"}) is Outcome.FAILED
    assert "not an after-response message body" in caplog.text
    assert runner.stats().failed == 2
    assert "ada" not in caplog.text


async def test_a_flood_of_messages_that_cannot_run_is_one_line_each_and_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A deploy that forgot a module, or a queue shared with another app: every message fails
    # the same way. One line in full per name and reason, the rest counted, all counted.
    runner = WorkerRunner("test", log_interval=3600)
    missing = body("greet", "ada")
    missing["target"] = "tests.worker_effects:gone"
    for _ in range(5):
        assert await runner.run(missing) is Outcome.FAILED
        assert await runner.run({"not": "ours"}) is Outcome.FAILED
    assert caplog.text.count("cannot be imported here") == 1
    assert caplog.text.count("not an after-response message body") == 1
    runner.shutdown()
    summaries = sorted(r.getMessage() for r in caplog.records if hasattr(r, "aggregated_count"))
    assert [summary.split(" in the last ")[0] for summary in summaries] == [
        "... and 4 more bad messages to the test worker",
        "... and 4 more tasks of greet",
    ]
    assert summaries[1].endswith(": cannot be imported here (tests.worker_effects:gone)")
    assert runner.stats().failed == 10
    assert "ada" not in caplog.text


def test_a_sync_worker_runs_messages_on_the_runner_s_loop_thread(seen: list[Any]) -> None:
    runner = WorkerRunner("test")
    assert runner.run_blocking(body("greet", "ada")) is Outcome.SUCCEEDED
    assert runner.run_blocking(body("flaky", 1, attempts=2)) is Outcome.SUCCEEDED
    assert [name for name, *_ in seen] == ["greet hello ada", "flaky", "flaky"]


def test_the_worker_span_continues_the_trace_of_the_message() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    runner = WorkerRunner("test", tracer_provider=provider)
    with tracer.start_as_current_span("publish") as publish:
        carrier = trace_carrier(contextvars.copy_context())
    message = body("greet", "ada")
    message["trace"] = carrier
    runner.run_blocking(message)  # from the message's carrier: nothing current here
    with tracer.start_as_current_span("engine consumer") as consumer:
        runner.run_blocking(body("greet", "bob"))  # the span current in the calling thread
    spans = [span for span in exporter.get_finished_spans() if span.name.startswith("after_")]
    assert [span.name for span in spans] == ["after_response greet", "after_response greet"]
    first, second = spans
    assert first.parent is not None
    assert second.parent is not None
    assert first.parent.span_id == publish.get_span_context().span_id
    assert first.context.trace_id == publish.get_span_context().trace_id
    assert second.parent.span_id == consumer.get_span_context().span_id
    assert first.attributes is not None
    assert first.attributes["after_response.task.id"] == "id-greet"


def test_bodies_that_are_not_ours_say_what_is_wrong() -> None:
    good = body("greet", "ada")
    assert decode(good).target == "tests.worker_effects:greet"
    with pytest.raises(BadMessageError, match="not an after-response message body"):
        decode(["greet"])
    with pytest.raises(BadMessageError, match="this worker reads version"):
        decode({**good, "after_response": BODY_VERSION + 1})
    with pytest.raises(BadMessageError, match="'args' field must be a list, got a str"):
        decode({**good, "args": "ada"})


def test_an_engine_needs_a_store_and_must_be_an_engine(tmp_path: Any) -> None:
    class Custom:
        system = "custom"

        def check(self) -> None: ...

        async def start(self) -> None: ...

        async def publish(self, messages: Any) -> None: ...

        async def stop(self) -> None: ...

    assert isinstance(Custom(), Engine)
    with pytest.raises(TypeError, match=r"needs a durable store.*store=SQLiteStore"):
        AfterResponseMiddleware(lambda *a: None, engine=Custom())
    with pytest.raises(TypeError, match="engine must be an engine adapter such as CeleryEngine"):
        AfterResponseMiddleware(
            lambda *a: None, store=SQLiteStore(tmp_path / "s.db"), engine=object()
        )


def test_a_worker_rejects_an_async_dead_letter_hook() -> None:
    async def hook(letter: DeadLetter) -> None: ...

    with pytest.raises(TypeError, match="on_dead_letter must be a plain"):
        WorkerRunner("test", on_dead_letter=hook)
