"""A Celery app with after-response's engine: ``celery -A tests.engine_apps.celery_engine_app
worker``.

Configured from the environment (``tests.engine_apps``): the broker URL, a short visibility
timeout so a killed worker's message comes back in seconds, spans to a file when
``AFTER_RESPONSE_TEST_SPANS`` is set, and Celery's OpenTelemetry instrumentation when
``AFTER_RESPONSE_TEST_CELERY_INSTRUMENT`` is ``1``; a misconfigured runner task when
``AFTER_RESPONSE_TEST_CELERY_MISCONFIGURE`` is ``1``. Constructing the engine here, in the
module the worker imports, registers the runner task in the worker; its dead letters are
ledger lines ``dead-OUTCOME NAME ID PID ATTEMPT``.
"""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from after_response import DeadLetter
from after_response._engine import RUNNER_TASK
from after_response.celery import CeleryEngine
from tests.engine_apps import (
    BROKER_URL_ENV,
    LEDGER_ENV,
    celery_test_settings,
    log_interval,
    required_environment,
)
from tests.engine_apps.spans import install_from_environment

INSTRUMENT_ENV = "AFTER_RESPONSE_TEST_CELERY_INSTRUMENT"
# "1": annotate the runner task with acks_late=False, a misconfiguration the worker reports.
MISCONFIGURE_ENV = "AFTER_RESPONSE_TEST_CELERY_MISCONFIGURE"

# A web process that imports this module may have installed its exporter already.
if not isinstance(trace.get_tracer_provider(), TracerProvider):
    install_from_environment()

app = Celery("celery_engine_app", broker=required_environment(BROKER_URL_ENV))
app.conf.update(celery_test_settings())
if os.environ.get(MISCONFIGURE_ENV) == "1":
    app.conf.task_annotations = {RUNNER_TASK: {"acks_late": False}}


def record_dead_letter(dead: DeadLetter) -> None:
    """Append ``dead-OUTCOME NAME ID PID ATTEMPT`` to the ledger."""
    line = f"dead-{dead.outcome} {dead.task_name} {dead.task_id} {os.getpid()} {dead.attempts}\n"
    with Path(required_environment(LEDGER_ENV)).open("a", encoding="utf-8") as file:
        file.write(line)


engine = CeleryEngine(app, on_dead_letter=record_dead_letter, log_interval=log_interval())

if os.environ.get(INSTRUMENT_ENV) == "1":
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    CeleryInstrumentor().instrument()  # type: ignore[no-untyped-call]
