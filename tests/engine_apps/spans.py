"""A file span exporter for tests that compare traces across processes.

``install(path)`` sets a global SDK tracer provider whose spans are appended to ``path`` as
JSON lines: ``name``, ``kind``, ``trace_id``, ``span_id``, ``parent_id`` (hex, or null),
``attributes``. Web processes and workers append to their own files; the test reads both.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

SPANS_ENV = "AFTER_RESPONSE_TEST_SPANS"


class FileSpanExporter(SpanExporter):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            context = span.get_span_context()
            assert context is not None
            parent = span.parent
            lines.append(
                json.dumps(
                    {
                        "name": span.name,
                        "kind": span.kind.name,
                        "trace_id": format(context.trace_id, "032x"),
                        "span_id": format(context.span_id, "016x"),
                        "parent_id": None if parent is None else format(parent.span_id, "016x"),
                        "attributes": dict(span.attributes or {}),
                        "pid": os.getpid(),
                    },
                    default=str,
                )
            )
        with self._lock, self.path.open("a", encoding="utf-8") as file:
            file.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS


def install(path: str | Path) -> TracerProvider:
    """Export every span of this process to ``path`` (JSON lines)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(Path(path))))
    trace.set_tracer_provider(provider)
    return provider


def install_from_environment() -> TracerProvider | None:
    """``install($AFTER_RESPONSE_TEST_SPANS)`` if that variable is set."""
    path = os.environ.get(SPANS_ENV)
    return install(path) if path else None


def read(path: str | Path) -> list[dict[str, Any]]:
    """The spans exported to ``path`` so far."""
    file = Path(path)
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line]
