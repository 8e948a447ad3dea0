"""The web process handing receipts to taskiq: ``uvicorn examples.engines.web_taskiq:app``.

Environment: ``REDIS_URL`` (``redis://127.0.0.1:6379/0``), ``AFTER_RESPONSE_DB``
(``after_response.sqlite3``).
"""

from __future__ import annotations

from examples.engines.shop import create_app
from examples.engines.taskiq_broker import engine

app = create_app(engine=engine)
