"""The test modes that ``after_response.testing`` switches on: capture side effects instead
of running them, or run them inline, inside their request's own ASGI call.

Process-wide on purpose: Starlette's ``TestClient`` runs the app in a thread of its own, which
a context variable set by the test would not reach.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from ._options import Retry


class CapturedCall(NamedTuple):
    """A side effect a handler added while capturing: recorded, not run."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    timeout: float | None
    retry: Retry
    run_on_error: bool
    method: str
    path: str


#: Where captured calls go, while capturing (``None``: side effects are added as usual).
captured: list[CapturedCall] | None = None
#: Whether side effects run inside their request's call, as they do without lifespan.
inline = False
