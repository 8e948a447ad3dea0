"""Minimal Celery and taskiq apps that the broker tests start real workers for.

The worker processes read everything from their environment, so the tests never import the
apps: they publish by task name, as a web process that does not import the worker's code would.
Each task appends a line to a ledger file: ``EVENT ENTRY TASK_ID PID``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

BROKER_URL_ENV = "AFTER_RESPONSE_TEST_BROKER_URL"
LEDGER_ENV = "AFTER_RESPONSE_TEST_LEDGER"
# How long an unacknowledged message stays invisible before another worker may take it back
# (Celery's visibility_timeout, taskiq-redis's idle_timeout): short here, so that a test sees
# a killed worker's task redelivered in seconds rather than in the default hour or ten minutes.
REDELIVERY_SECONDS_ENV = "AFTER_RESPONSE_TEST_REDELIVERY_SECONDS"
# The engines' log_interval in the workers (default 5).
LOG_INTERVAL_ENV = "AFTER_RESPONSE_TEST_LOG_INTERVAL"

CELERY_RECORD_TASK = "engine_apps.celery.record"
TASKIQ_RECORD_TASK = "engine_apps.taskiq.record"

# Bound on how long a task waits for its gate file: a task a test forgot to open ends.
GATE_LIMIT_SECONDS = 30.0


def required_environment(name: str) -> str:
    """The value of environment variable ``name``; a clear error when it is not set."""
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(
            f"{name} is not set: the test apps' workers take their settings from the "
            "environment; start them with tests.brokers.celery_worker() or taskiq_worker()"
        )
    return value


def log_interval() -> float:
    """The engine's ``log_interval`` in the worker (default 5 s)."""
    return float(os.environ.get(LOG_INTERVAL_ENV, "5"))


def redelivery_seconds() -> float:
    """Seconds before an unacknowledged message is redelivered (default 3)."""
    return float(os.environ.get(REDELIVERY_SECONDS_ENV, "3"))


def record(entry: str, task_id: str, gate: str | None) -> None:
    """Append ``started`` to the ledger; wait for ``gate`` to exist if given; append ``done``.

    The gate lets a test kill the worker while the task is known to be running.
    """
    ledger = Path(required_environment(LEDGER_ENV))
    _append(ledger, "started", entry, task_id)
    if gate is not None:
        wait_for_gate(gate)
    _append(ledger, "done", entry, task_id)


def wait_for_gate(gate: str) -> None:
    """Poll until the file ``gate`` exists; ``TimeoutError`` after GATE_LIMIT_SECONDS."""
    deadline = time.monotonic() + GATE_LIMIT_SECONDS
    while not Path(gate).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate file {gate} never appeared")
        time.sleep(0.02)


def celery_test_settings() -> dict[str, object]:
    """The Celery settings of the test apps: redelivery in seconds, not the default hour."""
    return {
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": redelivery_seconds(),
            # Sweep for abandoned messages every second (default: every 10 x 10 s).
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            # The sweep's lock, should a killed worker have held it, expires soon.
            "unacked_mutex_expire": 5,
        },
        "task_ignore_result": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
    }


def _append(ledger: Path, event: str, entry: str, task_id: str) -> None:
    with ledger.open("a", encoding="utf-8") as file:
        file.write(f"{event} {entry} {task_id} {os.getpid()}\n")
