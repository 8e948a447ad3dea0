"""A Celery app for the broker tests: ``celery -A tests.engine_apps.celery_app worker``.

Its one task acknowledges late and is rejected (requeued) when its worker process is lost:
the settings the Celery engine relies on for redelivery after a ``kill -9``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from tests.engine_apps import (
    BROKER_URL_ENV,
    CELERY_RECORD_TASK,
    celery_test_settings,
    record,
    required_environment,
)

app = Celery("engine_apps", broker=required_environment(BROKER_URL_ENV))
app.conf.update(celery_test_settings())


@app.task(name=CELERY_RECORD_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def record_task(self: Any, entry: str, gate: str | None = None) -> None:
    """Record ``entry`` in the ledger (see ``tests.engine_apps.record``)."""
    record(entry, self.request.id, gate)
