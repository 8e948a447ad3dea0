"""The pytest plugin of after-response (registered through the ``pytest11`` entry point):
fixtures around :mod:`after_response.testing`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .testing import CapturedCalls, capture, run_inline


@pytest.fixture
def after_response_calls() -> Iterator[CapturedCalls]:
    """The side effects added during the test, captured instead of run."""
    with capture() as calls:
        yield calls


@pytest.fixture
def after_response_inline() -> Iterator[None]:
    """Side effects run inside their request's call during the test: done with the response."""
    with run_inline():
        yield
