"""The tracing example does what its docstring says: trees on the console, or OTLP/HTTP export
(proved against a real OTLP/HTTP receiver on 127.0.0.1)."""

from __future__ import annotations

import gzip
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OTLPSpan
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from examples import tracing_app

from .servers import serve_uvicorn

ROOT = Path(__file__).resolve().parent.parent
EMAILS = ("ada@example.com", "grace@example.com")


@pytest.fixture
def console() -> Iterator[tuple[tracing_app.Telemetry, list[str], InMemorySpanExporter]]:
    """The example's console telemetry, writing into a list; spans also kept in memory."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    lines: list[str] = []
    telemetry = tracing_app.configure_telemetry(lines.append, quiet_period=None)
    exporter = InMemorySpanExporter()
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield telemetry, lines, exporter
    telemetry.shutdown()
    monkeypatch.undo()


def tree_of(lines: list[str], root: str) -> list[str]:
    """The lines of the printed tree whose root span is ``root``."""
    start = next(i for i, line in enumerate(lines) if line.startswith(root))
    tree = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(("├", "└", "│", " ")):
            break
        tree.append(line)
    return tree


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return sorted(
        (s for s in spans if s.name == name),
        key=lambda s: (s.attributes or {}).get("after_response.task.attempt", 0),
    )


@pytest.mark.anyio
async def test_login_and_signup_traces_nest_each_side_effect_under_its_request(
    console: tuple[tracing_app.Telemetry, list[str], InMemorySpanExporter],
) -> None:
    telemetry, lines, exporter = console
    statuses = await tracing_app.self_test(telemetry, lines.append)

    assert statuses == [200, 201]
    spans = exporter.get_finished_spans()
    [login] = by_name(spans, "POST /login")
    [email] = by_name(spans, "after_response send_verification_email")
    assert login.context is not None
    assert email.context is not None
    assert email.parent is not None
    assert email.parent.span_id == login.context.span_id
    assert email.context.trace_id == login.context.trace_id
    # The span the side effect opened itself nests under the side effect's span.
    [smtp] = [
        s
        for s in by_name(spans, "smtp send")
        if s.parent is not None and s.parent.span_id == email.context.span_id
    ]
    assert smtp.context is not None
    assert smtp.context.trace_id == login.context.trace_id
    [signup] = by_name(spans, "POST /signup")
    assert signup.context is not None
    effects = [s for s in spans if s.parent and s.parent.span_id == signup.context.span_id]
    assert sorted(
        (s.name, (s.attributes or {})["after_response.task.outcome"]) for s in effects
    ) == [
        ("after_response send_welcome_email", "succeeded"),
        ("after_response sync_crm", "retry"),
        ("after_response sync_crm", "succeeded"),
        ("after_response track_signup", "failed"),
    ]

    # The printed trees: the same structure, indented, and no personal data.
    assert [line.split("  (")[0] for line in tree_of(lines, "POST /login")] == [
        "POST /login",
        "└─ after_response send_verification_email",
        "   └─ smtp send",
    ]
    signup_tree = tree_of(lines, "POST /signup")
    assert len(signup_tree) == 1 + 4 * 2  # four attempts, each with its client span
    assert any("track_signup" in line and "failed" in line for line in signup_tree)
    assert any("sync_crm" in line and "attempt 2, succeeded" in line for line in signup_tree)
    assert not [line for line in lines if any(address in line for address in EMAILS)]
    assert "4 side effects: 3 succeeded, 1 failed, 1 retried" in lines[-1]


@pytest.mark.anyio
async def test_server_mode_prints_a_trace_once_its_side_effects_are_done() -> None:
    """Serving (not --self-test), a trace prints by itself after a quiet period, with the
    side effects that ran after the response in it."""
    printed = threading.Event()
    lines: list[str] = []

    def write(line: str) -> None:
        lines.append(line)
        if "smtp send" in line:
            printed.set()

    telemetry = tracing_app.configure_telemetry(write, quiet_period=0.5)
    app, _ = tracing_app.create_app(telemetry.tracer_provider)
    try:
        async with serve_uvicorn(app) as url, httpx.AsyncClient(base_url=url) as client:
            await client.post("/login", json={"email": EMAILS[0]})
            assert await anyio.to_thread.run_sync(printed.wait, 10)
    finally:
        telemetry.shutdown()
    tree = tree_of(lines, "POST /login")
    assert [line.split("  (")[0] for line in tree] == [
        "POST /login",
        "└─ after_response send_verification_email",
        "   └─ smtp send",
    ]


def example_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        PYTHONPATH=str(ROOT / "src"),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        **extra,
    )
    return env


@pytest.mark.anyio
async def test_self_test_command_prints_both_trees_and_exits_zero() -> None:
    result = await anyio.run_process(
        [sys.executable, str(ROOT / "examples" / "tracing_app.py"), "--self-test"],
        env=example_env(),
        check=False,
    )
    output = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "POST /login  (server" in output
    assert "└─ after_response send_verification_email" in output
    assert "POST /signup  (server" in output
    assert "error.type=ConnectionError" in output
    errors = result.stderr.decode()
    # The failure is logged with the task, the request and the trace to find it in.
    assert "task_name=track_signup request_method=POST request_path=/signup trace_id=" in errors
    assert not [address for address in EMAILS if address in output + errors]


class OTLPReceiver:
    """A minimal OTLP/HTTP receiver: accepts protobuf POSTs on /v1/traces and /v1/metrics."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, str], OTLPSpan]] = []
        self.metric_names: set[str] = set()
        self.app = Starlette(
            routes=[
                Route("/v1/traces", self.traces, methods=["POST"]),
                Route("/v1/metrics", self.metrics, methods=["POST"]),
            ]
        )

    async def _body(self, request: Request) -> bytes:
        body = await request.body()
        assert request.headers["content-type"] == "application/x-protobuf"
        return gzip.decompress(body) if request.headers.get("content-encoding") == "gzip" else body

    async def traces(self, request: Request) -> Response:
        export = ExportTraceServiceRequest.FromString(await self._body(request))
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((resource, span) for span in scope_spans.spans)
        content = ExportTraceServiceResponse().SerializeToString()
        return Response(content, media_type="application/x-protobuf")

    async def metrics(self, request: Request) -> Response:
        export = ExportMetricsServiceRequest.FromString(await self._body(request))
        for resource_metrics in export.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                self.metric_names.update(m.name for m in scope_metrics.metrics)
        content = ExportMetricsServiceResponse().SerializeToString()
        return Response(content, media_type="application/x-protobuf")


@pytest.mark.anyio
async def test_with_an_otlp_endpoint_spans_and_metrics_reach_the_receiver() -> None:
    receiver = OTLPReceiver()
    async with serve_uvicorn(receiver.app) as endpoint:
        result = await anyio.run_process(
            [sys.executable, str(ROOT / "examples" / "tracing_app.py"), "--self-test"],
            env=example_env(
                OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_SERVICE_NAME="tracing-example"
            ),
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode()
    assert f"spans went to OTLP/HTTP {endpoint}" in result.stdout.decode()
    assert "POST /login  (server" not in result.stdout.decode()  # exported, not printed

    spans = {span.name: (resource, span) for resource, span in receiver.spans}
    resource, login = spans["POST /login"]
    _, email = spans["after_response send_verification_email"]
    [smtp] = [s for _, s in receiver.spans if s.parent_span_id == email.span_id]
    assert resource["service.name"] == "tracing-example"
    assert login.kind == OTLPSpan.SPAN_KIND_SERVER
    assert email.kind == OTLPSpan.SPAN_KIND_INTERNAL
    assert email.trace_id == login.trace_id
    assert email.parent_span_id == login.span_id
    assert smtp.name == "smtp send"
    attributes = {a.key: a.value for a in email.attributes}
    assert attributes["after_response.task.outcome"].string_value == "succeeded"
    assert attributes["after_response.task.attempt"].int_value == 1
    assert set(spans) >= {
        "POST /signup",
        "after_response track_signup",
        "after_response sync_crm",
    }
    assert {
        "after_response.task.added",
        "after_response.task.finished",
        "after_response.task.duration",
    } <= receiver.metric_names
    exported = b"".join(span.SerializeToString() for _, span in receiver.spans)
    assert not [address for address in EMAILS if address.encode() in exported]


def test_metrics_export_can_be_turned_off_for_trace_only_backends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    telemetry = tracing_app.configure_telemetry()
    try:
        assert telemetry.meter_provider is None
        assert telemetry.printer is None
        assert telemetry.destination == "OTLP/HTTP http://127.0.0.1:4318"
    finally:
        telemetry.shutdown()  # nothing was recorded: nothing is sent
