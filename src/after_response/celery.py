"""Hand durable side effects to Celery: ``AfterResponseMiddleware(engine=CeleryEngine(app))``.

Constructing :class:`CeleryEngine` registers one generic runner task, ``after_response.run``,
on the Celery app; the web process publishes every durable side effect as a call of it, and
a Celery worker runs it with the in-process semantics (``after_response._worker``).

**Where to construct it.** In the module that defines your Celery app, the one the worker
imports (``celery -A proj worker`` imports ``proj``), right after the app::

    app = Celery("proj", broker="redis://localhost:6379/0")
    engine = CeleryEngine(app)

The web process imports the same module and passes ``engine`` to the middleware. An engine
constructed elsewhere (only in the web app's module, say) leaves the workers without the
runner task: Celery rejects its messages as unregistered. Constructing it in the web process
too matters when ``opentelemetry-instrumentation-celery`` is installed there: the
instrumentation ends its publish span only for tasks Celery's current app knows.

The runner task acknowledges late and is requeued when its worker process is lost
(``acks_late``, ``reject_on_worker_lost``); :meth:`CeleryEngine.start` checks that nothing
(``task_annotations``, say) turned that off.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any, Final

from celery import Celery, Task, signals

from ._celery_publish import Publisher
from ._checks import check_seconds
from ._dead_letters import DeadLetterHook
from ._engine import RUNNER_TASK, Message
from ._errors import EngineConfigurationError
from ._logs import logger
from ._worker import WorkerRunner

__all__ = ["CeleryEngine"]

#: What the runner task relies on, as its attributes after Celery applied the app's
#: ``task_annotations`` (the task sets them itself, so the app-wide ``task_acks_late``,
#: ``task_acks_on_failure_or_timeout``... do not change them): attribute, required value.
_REQUIRED: Final = (
    ("acks_late", True),
    ("reject_on_worker_lost", True),
    ("acks_on_failure_or_timeout", True),
    ("acks_on_failure", True),
    ("acks_on_timeout", True),
    # Recent Celery: a lost task re-sent as a retry is dropped once max_retries run out.
    ("retry_on_worker_lost", False),
)

_engines: weakref.WeakKeyDictionary[Celery, CeleryEngine] = weakref.WeakKeyDictionary()
_engines_lock = threading.Lock()


class CeleryEngine:
    """Publishes durable side effects to a Celery app, and runs them in its workers.

    Args:
        celery_app: the Celery app the workers run (``celery -A proj worker``).
        queue: the queue to publish to (start the workers with ``-Q`` naming it); default:
            the app's routing for ``after_response.run`` (``task_routes``), else its
            default queue.
        on_dead_letter: called in the worker, in a thread of its own, with a
            ``DeadLetter`` for every side effect whose last attempt failed or timed out.
            A worker process that stops gives it 5 s for the dead letters it still has.
        log_interval: seconds over which the worker aggregates its lines about side effects
            that failed, timed out or will be retried (per task name and what happened: the
            first in full, with its traceback, the rest counted in one summary line), as
            ``AfterResponseMiddleware(log_interval=...)`` does.
        publish_timeout: seconds one :meth:`start` or :meth:`publish` call may take before
            it raises ``TimeoutError``; also the broker connection's connect and socket
            timeouts.

    Attributes:
        system: ``"celery"``.
        runner: the worker-side runner; ``engine.runner.stats()`` counts this process's runs.

    Raises:
        TypeError: ``celery_app`` is not a Celery app, or an option has the wrong type (a
            ``publish_timeout`` or ``log_interval`` that is not a number).
        ValueError: ``publish_timeout`` or ``log_interval`` is not positive and finite, or the
            app already has an engine (construct one per app, and share it).
    """

    system: str = "celery"

    def __init__(
        self,
        celery_app: Celery,
        *,
        queue: str | None = None,
        on_dead_letter: DeadLetterHook | None = None,
        publish_timeout: float = 10.0,
        log_interval: float = 5.0,
    ) -> None:
        if not isinstance(celery_app, Celery):
            raise TypeError(
                f"CeleryEngine(celery_app) expects a celery.Celery app, got a "
                f"{type(celery_app).__name__}: pass the app your workers run "
                "(celery -A proj worker)"
            )
        if queue is not None and (not isinstance(queue, str) or not queue):
            raise TypeError(f"CeleryEngine(queue=...) must be a queue name or None, got {queue!r}")
        publish_timeout = check_seconds(
            "CeleryEngine(publish_timeout=...)", publish_timeout, or_none=False
        )
        self.runner = WorkerRunner(
            self.system, on_dead_letter=on_dead_letter, log_interval=log_interval
        )
        self.app = celery_app
        self.queue = queue
        self.publish_timeout = float(publish_timeout)
        self._publisher: Publisher | None = None
        with _engines_lock:
            if celery_app in _engines:
                raise ValueError(
                    f"the Celery app {celery_app.main!r} already has a CeleryEngine (its "
                    f"{RUNNER_TASK} task is registered once): construct one engine per app, "
                    "next to the app, and import it where you need it"
                )
            _engines[celery_app] = self
        self._register()

    def _register(self) -> None:
        runner = self.runner

        @self.app.task(
            name=RUNNER_TASK,
            bind=True,
            shared=False,
            ignore_result=True,
            acks_late=True,
            reject_on_worker_lost=True,
            acks_on_failure_or_timeout=True,
            acks_on_failure=True,
            acks_on_timeout=True,
            retry_on_worker_lost=False,
        )
        def run(task: Task[Any, Any], body: object) -> None:
            # kombu's Redis transport marks a message it restores (a lost worker's, or one
            # past the visibility timeout) as redelivered; a first delivery is not.
            delivery_info = task.request.delivery_info or {}
            runner.run_blocking(body, redelivered=bool(delivery_info.get("redelivered")))

        signals.worker_init.connect(self._check_in_worker, weak=False)
        # A prefork pool's processes stop with worker_process_shutdown, and a solo or threads
        # pool's worker with worker_shutdown: either way, the runner that ran there.
        signals.worker_process_shutdown.connect(self._stop_in_worker, weak=False)
        signals.worker_shutdown.connect(self._stop_in_worker, weak=False)

    def _stop_in_worker(self, **_: object) -> None:
        self.runner.shutdown()

    def _check_in_worker(self, sender: object = None, **_: object) -> None:
        """At a worker's start-up: log what in its configuration undoes the runner's
        delivery settings (the worker's configuration is the one that counts)."""
        if getattr(sender, "app", None) is not self.app:
            return
        for problem in _settings_problems(self.app):
            logger.error("after-response: the %s task %s", RUNNER_TASK, problem)

    def check(self) -> None:
        """Check the runner task's settings (at lifespan startup, before the app serves).

        Raises:
            EngineConfigurationError: a setting turns off what the hand-off relies on (the
                message names the setting and the fix).
        """
        problems = _settings_problems(self.app)
        if problems:
            raise EngineConfigurationError(
                f"CeleryEngine: the {RUNNER_TASK} task of Celery app {self.app.main!r} "
                f"cannot hand off side effects safely: it {'; it '.join(problems)}"
            )

    async def start(self) -> None:
        """Check the runner task's settings, and connect to the broker.

        Raises:
            EngineConfigurationError: as :meth:`check`.
            TimeoutError: the broker did not answer within ``publish_timeout`` seconds.
            Exception: the broker refused the connection (kombu's error).
        """
        self.check()
        if self._publisher is None:
            self._publisher = Publisher(self.app, self.queue, self.publish_timeout)
        await self._publisher.start()

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish each message as a call of the runner task, under its own trace context.

        The task id is the message id; the body is the task's one argument; the message's
        trace headers are the Celery message's headers. The batch goes to Redis in one
        pipeline (kombu 5.7+; each message on its own otherwise, as with a client that
        retries on timeout). Returns once the broker accepted every message.

        Raises:
            RuntimeError: the engine is not started (or already stopped).
            TimeoutError: the batch took more than ``publish_timeout`` seconds (messages
                before the slow one may be published: they are sent again, at least once).
            Exception: the broker failed (kombu's error).
        """
        if self._publisher is None:
            raise RuntimeError("CeleryEngine.publish() before start(): await engine.start()")
        await self._publisher.publish(list(messages))

    async def stop(self) -> None:
        """Release the broker connection and the publishing thread; idempotent."""
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.close()


def _settings_problems(app: Celery) -> list[str]:
    """What, in ``app``'s configuration, undoes the runner task's delivery settings (each
    naming the setting and the fix); empty when all is well."""
    task = app.tasks.get(RUNNER_TASK)
    if task is None:
        return ["is not registered on this app; construct CeleryEngine(app)"]
    problems = []
    for attribute, required in _REQUIRED:
        value = getattr(task, attribute, required)  # absent in older Celery: not relied on
        if value is not None and bool(value) is not required:
            problems.append(
                f"has {attribute}={value!r}, set by the task_annotations setting; "
                f"after-response needs {attribute}={required}: remove {attribute} from the "
                f"annotations that match {RUNNER_TASK} (or '*')"
            )
    return problems
