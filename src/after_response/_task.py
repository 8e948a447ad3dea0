"""A task on its way through a dispatcher: the record, the live call, and its run state."""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Callable
from contextvars import Context
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ._errors import NoCurrentTaskError
from ._record import TaskRecord

if TYPE_CHECKING:
    from ._metrics import NameTally


class Outcome(str, enum.Enum):
    """How a task (or one attempt of it) ended; the value names it in logs, spans and metrics."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    DISCARDED = "discarded"
    SHED = "shed"
    ABANDONED = "abandoned"
    #: A durable add whose key matched a stored task: not stored, not run again.
    DEDUPLICATED = "deduplicated"
    #: A durable task left unfinished at shutdown: in the store, for the next process.
    RELEASED = "released"
    #: A durable task published to a distributed engine (Celery, taskiq), to run there.
    HANDED_OFF = "handed_off"
    #: An attempt that failed and will run again: never a task's terminal state.
    RETRY = "retry"

    def __str__(self) -> str:
        return self.value

    # Enum's own __hash__ is a Python function: as a dict key on the per-task path, hash
    # the string instead (equal members are equal strings, so this is consistent).
    __hash__ = str.__hash__


#: The terminal states, in the order ``Stats`` lists them.
TERMINAL: Final = (
    Outcome.SUCCEEDED,
    Outcome.FAILED,
    Outcome.TIMED_OUT,
    Outcome.DISCARDED,
    Outcome.SHED,
    Outcome.ABANDONED,
    Outcome.DEDUPLICATED,
    Outcome.RELEASED,
    Outcome.HANDED_OFF,
)


#: Every outcome's value, the keys of the metrics' per-outcome counts.
OUTCOME_VALUES: Final = tuple(outcome.value for outcome in Outcome)


class Task:
    """The live side of one side effect: its record, the function and the context to run it
    in, and how far it has got. One object for all of its attempts.

    ``on_end`` is the owner's per-request bookkeeping (a callback, not a link back to the
    collector); it is dropped once the task has ended.
    """

    __slots__ = (
        "attempt",
        "blocked",
        "context",
        "done",
        "fn",
        "gated",
        "is_async",
        "on_end",
        "owner",
        "ready_at",
        "record",
        "recovered",
        "running",
        "seq",
        "slot",
        "span",
        "tally",
    )

    def __init__(
        self,
        record: TaskRecord,
        fn: Callable[..., Any],
        is_async: bool,
        context: Context,
        seq: int,
    ) -> None:
        self.record = record
        self.fn = fn
        self.is_async = is_async
        self.context = context
        #: Order of ``add()`` across the middleware: ``drain()`` waits for the tasks before it.
        self.seq = seq
        self.attempt = 1
        self.ready_at = 0.0
        self.on_end: Callable[[], None] | None = None
        #: What runs it (a task set or task group), once a dispatcher has taken it.
        self.owner: Any = None
        #: The asyncio task of its current run, when its owner is a native task set.
        self.running: Any = None
        #: Whether it holds one of the ``max_concurrency`` slots now.
        self.slot = False
        #: Whether it holds a slot of its name's own limits (``max_concurrency``, rate).
        self.gated = False
        self.done = False
        #: The current attempt's span, if tracing is on.
        self.span: Any = None
        #: Set by the loop watchdog's thread while this task holds the event loop.
        self.blocked = False
        #: A durable task taken over from a process that died.
        self.recovered = False
        #: Its name's metric counts, once metrics were on when it was added.
        self.tally: NameTally | None = None

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def id(self) -> str:
        return self.record.id

    def __repr__(self) -> str:
        return f"<Task {self.record.name} {self.record.id} attempt={self.attempt}>"


@dataclass(frozen=True)
class DeadLetter:
    """A task that ended without success, as ``on_dead_letter`` receives it.

    Attributes:
        task_name: the task's name (as in logs, spans and metrics).
        task_id: the task's id (as in logs and spans).
        exception: what ended it: the side effect's own exception, or
            ``TaskTimeoutError``, ``TaskShedError``, ``TaskAbandonedError``; for a stored
            task taken over and not run, ``ImportError`` (its function is gone) or
            ``TaskProcessDiedError``.
        attempts: how many attempts started (0 for a task that never ran).
        outcome: ``"failed"``, ``"timed_out"``, ``"shed"`` or ``"abandoned"``.
    """

    task_name: str
    task_id: str
    exception: BaseException
    attempts: int
    outcome: str


@dataclass(frozen=True)
class CurrentTask:
    """What a running side effect can learn about itself, from :func:`current_task`.

    Attributes:
        id: unique, and the same on every attempt: send it as an ``Idempotency-Key``.
        name: the task's name.
        attempt: this attempt's number, from 1.
        recovered: whether this run replays a task whose process died.
    """

    id: str
    name: str
    attempt: int
    recovered: bool = False


#: What current_task() reports: (id, name, attempt, recovered), set as each attempt starts.
#: Plain data, so that the context of a side effect's asyncio task (alive a loop turn after
#: the side effect ends, and copied into its threads and child tasks) keeps nothing else alive.
RunningTask = tuple[str, str, int, bool]
_running: Final[contextvars.ContextVar[RunningTask | None]] = contextvars.ContextVar(
    "after_response_task", default=None
)
set_running_task: Final = _running.set


def current_task() -> CurrentTask:
    """The side effect running here: its id, name and attempt number.

    Works inside any side effect, ``async def`` or plain (in its worker thread)::

        async def charge(order_id: str) -> None:
            task = after_response.current_task()
            await payments.post(..., headers={"Idempotency-Key": task.id})

    Raises:
        NoCurrentTaskError: (a ``LookupError``) outside a running side effect.
    """
    running = _running.get()
    if running is None:
        raise NoCurrentTaskError(
            "after_response.current_task() works only inside a running side effect (a "
            "function passed to add()); call it from the side effect itself, or from code "
            "it calls."
        )
    return CurrentTask(*running)
