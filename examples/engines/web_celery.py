"""The web process handing receipts to Celery: ``uvicorn examples.engines.web_celery:app``.

Environment: ``REDIS_URL`` (``redis://127.0.0.1:6379/0``), ``AFTER_RESPONSE_DB``
(``after_response.sqlite3``).
"""

from __future__ import annotations

from examples.engines.celery_app import engine
from examples.engines.shop import create_app

app = create_app(engine=engine)
