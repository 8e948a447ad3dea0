from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.brokers import redis_server

# The project's own pytest plugin, loaded here rather than through its entry point (which
# pyproject's addopts turns off): an entry-point plugin is imported before coverage starts.
pytest_plugins = ["after_response.pytest_plugin"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """Spans of the test's tracer provider, in memory."""
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """An SDK tracer provider passed explicitly (the global one is never set twice)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis of the test's own (Debian's redis-server on a free port); its URL."""
    with redis_server() as url:
        yield url
