"""The taskiq side: ``taskiq worker examples.engines.taskiq_broker:broker``.

The worker imports this module; so does the web process (``web_taskiq.py``). Constructing
``TaskiqEngine(broker)`` here, next to the broker, registers after-response's runner task
(``after_response.run``) where the worker sees it. The side effects come from
``examples.engines.shop``, which both processes import.

Environment: ``REDIS_URL``, the broker (``redis://127.0.0.1:6379/0``).
"""

from __future__ import annotations

import os

from taskiq_redis import RedisStreamBroker

from after_response.taskiq import TaskiqEngine
from examples.engines import shop  # noqa: F401  (the side effects the worker runs, by name)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

# A stream broker: consumer groups and acknowledgements, so a message whose worker died
# before acknowledging it is delivered again; the lock on reclaiming such messages expires,
# so a worker killed while it held it does not stop the reclaiming for good.
broker = RedisStreamBroker(REDIS_URL, unacknowledged_lock_timeout=30)

engine = TaskiqEngine(broker)
