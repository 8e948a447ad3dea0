"""How code reaches the collector of the request it runs for: ``current()`` from anywhere in
the request's call stack (a context variable the middleware sets), ``get(request)`` from a
Starlette or FastAPI request."""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Final

from ._collector import Collector
from ._errors import NoActiveRequestError

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection

#: The collector of the request being handled (set by the middleware for its call).
current_collector: Final[contextvars.ContextVar[Collector | None]] = contextvars.ContextVar(
    "after_response_collector", default=None
)

_INSTALL_HINT: Final = (
    "Wrap your ASGI app: app = AfterResponseMiddleware(app) (or, in Starlette and FastAPI, "
    "app.add_middleware(AfterResponseMiddleware))"
)


def current() -> Collector:
    """The collector of the request being handled, from anywhere in its call stack.

    Works in service layers, Quart and Django views, and in side effects themselves (a
    side effect may add follow-up side effects).

    Raises:
        NoActiveRequestError: (a ``LookupError``) outside a request handled by
            ``AfterResponseMiddleware``.
    """
    collector = current_collector.get()
    if collector is None:
        raise NoActiveRequestError(
            "after_response.current() was called outside a request handled by "
            f"AfterResponseMiddleware. {_INSTALL_HINT}, and call current() while a request "
            "is being handled."
        )
    return collector


def get(request: HTTPConnection, state_key: str = "after_response") -> Collector:
    """The collector of ``request`` (a Starlette/FastAPI ``Request`` or ``WebSocket``).

    The same as ``request.state.after_response``, with an error that says what to do when
    the middleware is missing (rather than Starlette's bare ``AttributeError``).

    Raises:
        NoActiveRequestError: (a ``LookupError``) when ``AfterResponseMiddleware`` does not
            wrap the app that handles ``request``.
    """
    return collector_of(request, state_key, "after_response.get(request)")


def collector_of(request: HTTPConnection, state_key: str, asker: str) -> Collector:
    """:func:`get`, for ``asker`` (what the error message says found no collector)."""
    state = request.scope.get("state")
    collector = state.get(state_key) if state else None
    if isinstance(collector, Collector):
        return collector
    collector = current_collector.get()
    if collector is not None:
        return collector
    raise NoActiveRequestError(
        f"{asker} found no collector on this request (state key "
        f"{state_key!r}): AfterResponseMiddleware is not installed around this app. "
        f"{_INSTALL_HINT}."
    )
