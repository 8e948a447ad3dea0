"""The hand-off to a distributed task engine (Celery, taskiq): what an engine implements, and
the message it carries from the web process to its workers.

A durable task is written to the store's outbox before its response completes; after the
response, the relay (``_relay``) publishes it through an :class:`Engine` and marks it
published. In the engine's worker, one generic runner task (``_worker``) rebuilds the call
from the message and runs it as the in-process executor would.

The message body is JSON, the stored record (``StoredTask``) in a versioned envelope: the
worker imports the side effect by its stable name, so the body never holds a live object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from ._store import StoredTask

#: The name the generic runner task is registered under on the engine.
RUNNER_TASK: Final = "after_response.run"
#: The version of the message body; a worker refuses a body of a version it does not know.
BODY_VERSION: Final = 1
_BODY_KEY: Final = "after_response"


@dataclass(frozen=True)
class Message:
    """One durable task, ready to publish.

    Attributes:
        id: the task id: publish it as the engine's own message/task id, so the engine's
            logs, results and deduplication show the same id as ours.
        name: the side effect's name, for the engine's logs.
        body: JSON data, the runner task's one argument.
        headers: the W3C trace context (``traceparent``, ``tracestate``) of the publish
            span: send them as the message's headers, and publish under the context they
            describe when the engine's own OpenTelemetry instrumentation is on.
    """

    id: str
    name: str
    body: dict[str, Any]
    headers: dict[str, str]


@runtime_checkable
class Engine(Protocol):
    """What ``AfterResponseMiddleware(engine=...)`` needs from an engine adapter.

    ``CeleryEngine`` and ``TaskiqEngine`` implement it. ``publish`` may run again for a
    message already sent (a crash between publishing and marking it published): workers
    run each delivery, and ``current_task().id`` is the same on all of them.
    """

    #: The engine's name, as ``messaging.system`` on spans and in log lines.
    system: str

    def check(self) -> None:
        """Check the engine's settings, without connecting; called at lifespan startup,
        before the app serves (warnings are logged).

        Raises:
            EngineConfigurationError: a setting makes the hand-off unsafe: the lifespan
                startup fails with it, and the server does not start.
        """

    async def start(self) -> None:
        """Connect; called after :meth:`check`, in the background once the app serves.

        Raises:
            Exception: the broker cannot be reached (the relay retries, with backoff).
        """

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish every message, or raise; those published before the error may be sent
        again (at-least-once)."""

    async def stop(self) -> None:
        """Release connections and threads; called at lifespan shutdown."""


def encode(row: StoredTask, trace_context: Mapping[str, str]) -> dict[str, Any]:
    """The message body of a stored task; ``trace_context`` is the publish span's."""
    return {
        _BODY_KEY: BODY_VERSION,
        "id": row.id,
        "name": row.name,
        "target": row.target,
        "args": list(row.args),
        "kwargs": dict(row.kwargs),
        "options": dict(row.options),
        "request": {"method": row.request_method, "path": row.request_path},
        "trace": dict(trace_context),
        "attempt": row.attempt,
        "recovered": row.recovered,
    }


class BadMessageError(ValueError):
    """A message body that is not one of ours, or of a newer version (the text names the
    field that is wrong, never a value)."""


def decode(body: object) -> StoredTask:
    """The stored task a message body describes.

    Raises:
        BadMessageError: not an after-response body of a known version.
    """
    if not isinstance(body, Mapping) or _BODY_KEY not in body:
        raise BadMessageError(
            f"the {RUNNER_TASK} task got a {type(body).__name__} that is not an after-response "
            "message body (publish through AfterResponseMiddleware(engine=...))"
        )
    version = body[_BODY_KEY]
    if version != BODY_VERSION:
        raise BadMessageError(
            f"the message body is version {version!r}; this worker reads version "
            f"{BODY_VERSION}: run the same after-response version in the web processes and "
            "the workers"
        )
    try:
        request = body.get("request") or {}
        return StoredTask(
            id=_field(body, "id", str),
            name=_field(body, "name", str),
            target=_field(body, "target", str),
            args=_field(body, "args", list),
            kwargs=_field(body, "kwargs", dict),
            options=_field(body, "options", dict),
            request_method=str(request.get("method", "")),
            request_path=str(request.get("path", "")),
            trace_context=dict(body.get("trace") or {}),
            attempt=int(body.get("attempt", 0)),
            recovered=bool(body.get("recovered", False)),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise BadMessageError(f"malformed after-response message body: {exc}") from None


def _field(body: Mapping[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if not isinstance(value, kind):
        raise BadMessageError(
            f"the message body's {name!r} field must be a {kind.__name__}, got a "
            f"{type(value).__name__}"
        )
    return value
