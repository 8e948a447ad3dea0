"""FastAPI integration: ``AfterResponse``, a dependency that hands a path operation the
collector of its request::

    from after_response.fastapi import AfterResponse

    @app.post("/login")
    async def login(credentials: Credentials, after: AfterResponse) -> dict[str, str]:
        after.add(send_verification_email, credentials.email, code)
        return {"message": "Code sent"}

Only this module imports FastAPI; ``import after_response`` never does.
"""

from __future__ import annotations

from typing import Annotated, Final

try:
    from fastapi import Depends
    from starlette.requests import HTTPConnection
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "after_response.fastapi needs FastAPI: pip install fastapi (the rest of "
        "after_response works without it)"
    ) from exc

from ._collector import Collector
from ._current import collector_of

__all__ = ["AfterResponse"]

#: Where ``AfterResponseMiddleware`` puts the collector unless given another ``state_key``.
DEFAULT_STATE_KEY: Final = "after_response"


def _get_collector(connection: HTTPConnection) -> Collector:
    """The collector of the request (or websocket) being handled.

    Reads ``request.state`` under the middleware's default state key; with a custom
    ``state_key`` it falls back to the collector of the request's context, which the
    middleware sets whatever the key.

    Raises:
        NoActiveRequestError: (a ``LookupError``, as from ``current()``) when
            ``AfterResponseMiddleware`` does not wrap the app, so there is no collector to
            hand out; the request then fails with a 500.
    """
    return collector_of(connection, DEFAULT_STATE_KEY, "FastAPI's AfterResponse dependency")


AfterResponse = Annotated[Collector, Depends(_get_collector)]
"""A path operation (or dependency) parameter annotated ``AfterResponse`` receives the
request's :class:`~after_response.Collector`: ``after.add(fn, *args, **kwargs)`` runs
``fn`` once the response has been sent."""
