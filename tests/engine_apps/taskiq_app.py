"""A taskiq broker for the broker tests: ``taskiq worker tests.engine_apps.taskiq_app:broker``.

A Redis stream broker (consumer group, acknowledgements): a message acknowledged only after
its task has run stays pending when its worker is killed, and is claimed again. When to
acknowledge travels with each message (label ``ack_type``, set by the sender); without it the
worker's ``--ack-type`` applies (default ``when_saved``: after the result is stored).
"""

from __future__ import annotations

from typing import Annotated

from taskiq import Context, TaskiqDepends
from taskiq_redis import RedisStreamBroker

from tests.engine_apps import (
    BROKER_URL_ENV,
    TASKIQ_RECORD_TASK,
    record,
    redelivery_seconds,
    required_environment,
)

broker = RedisStreamBroker(
    required_environment(BROKER_URL_ENV),
    idle_timeout=int(redelivery_seconds() * 1000),
    # Read new messages for at most this long before looking for abandoned ones.
    xread_block=500,
    unacknowledged_lock_timeout=5,
)


# A plain function: taskiq runs it in its thread pool, so its wait for the gate does not
# block the worker's event loop.
def record_task(
    entry: str, context: Annotated[Context, TaskiqDepends()], gate: str | None = None
) -> None:
    """Record ``entry`` in the ledger (see ``tests.engine_apps.record``)."""
    record(entry, context.message.task_id, gate)


broker.register_task(record_task, task_name=TASKIQ_RECORD_TASK)
