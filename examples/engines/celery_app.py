"""The Celery side: ``celery -A examples.engines.celery_app worker --loglevel=INFO``.

The worker imports this module; so does the web process (``web_celery.py``). Constructing
``CeleryEngine(app)`` here, next to the app, registers after-response's runner task
(``after_response.run``) where the worker sees it. The side effects come from
``examples.engines.shop``, which both processes import.

Environment: ``REDIS_URL``, the broker (``redis://127.0.0.1:6379/0``).
"""

from __future__ import annotations

import os

from celery import Celery

from after_response.celery import CeleryEngine
from examples.engines import shop  # noqa: F401  (the side effects the worker runs, by name)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("shop", broker=REDIS_URL)
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    # One message at a time per worker process: with acks_late, a message a worker holds
    # but has not started is not stuck behind a long task.
    worker_prefetch_multiplier=1,
)

engine = CeleryEngine(app)
