"""A taskiq broker with after-response's engine, for the taskiq engine tests:
``taskiq worker tests.engine_apps.taskiq_engine_app:broker``.

Configured from the environment: the broker URL, a short redelivery time, spans exported to
a file (``AFTER_RESPONSE_TEST_SPANS``), and taskiq's OpenTelemetry middleware when
``AFTER_RESPONSE_TEST_TASKIQ_OTEL=1``. Constructing ``TaskiqEngine`` here, in the module the
worker imports, registers the runner task the web side publishes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from taskiq_redis import RedisStreamBroker

from after_response import DeadLetter
from after_response.taskiq import TaskiqEngine
from tests.engine_apps import (
    BROKER_URL_ENV,
    LEDGER_ENV,
    log_interval,
    redelivery_seconds,
    required_environment,
)
from tests.engine_apps.spans import install_from_environment

OTEL_MIDDLEWARE_ENV = "AFTER_RESPONSE_TEST_TASKIQ_OTEL"
#: A task that does nothing: the tests send it to wake a worker up (see nudge_taskiq_worker).
NOOP_TASK = "engine_apps.taskiq.noop"
#: Writes this worker process's ``engine.runner.stats()`` to a file, as JSON.
STATS_TASK = "engine_apps.taskiq.stats"

install_from_environment()

broker = RedisStreamBroker(
    required_environment(BROKER_URL_ENV),
    idle_timeout=int(redelivery_seconds() * 1000),
    # Look for abandoned messages at least every half second (after a non-empty read).
    xread_block=500,
    unacknowledged_lock_timeout=5,
)
if os.environ.get(OTEL_MIDDLEWARE_ENV) == "1":
    from taskiq.middlewares.opentelemetry_middleware import OpenTelemetryMiddleware

    broker.add_middlewares(OpenTelemetryMiddleware())


def dead_letter(letter: DeadLetter) -> None:
    """Ledger line ``dead-<outcome> <name> <id> <pid> <attempts>``."""
    line = f"dead-{letter.outcome} {letter.task_name} {letter.task_id} {os.getpid()} "
    with Path(required_environment(LEDGER_ENV)).open("a", encoding="utf-8") as file:
        file.write(f"{line}{letter.attempts}\n")


engine = TaskiqEngine(broker, on_dead_letter=dead_letter, log_interval=log_interval())


async def noop() -> None:
    """Nothing: a message that makes an idle worker read, then claim abandoned messages."""


broker.register_task(noop, task_name=NOOP_TASK)


def write_stats(path: str) -> None:
    """Write the runner's counts of this worker process to ``path`` (JSON), whole: the test
    reads it as soon as it exists, so it appears by a rename, never empty or half-written."""
    written = Path(f"{path}.part")
    written.write_text(json.dumps(asdict(engine.runner.stats())), encoding="utf-8")
    os.replace(written, path)


broker.register_task(write_stats, task_name=STATS_TASK)
