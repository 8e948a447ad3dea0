"""after-response: run a request's side effects after its response has gone out.

Concurrent and bounded, each in its own OpenTelemetry span, with timeouts, retries,
logged failures and a graceful drain at shutdown::

    from after_response import AfterResponseMiddleware

    app = AfterResponseMiddleware(app)

    async def login(request):
        request.state.after_response.add(send_verification_email, user.email, code)
        return JSONResponse({"message": "Code sent"})
"""

from ._accounting import Stats
from ._callable import side_effect
from ._collector import Collector, TaskAdder
from ._current import current, get
from ._dead_letters import DeadLetterHook
from ._errors import (
    AfterResponseError,
    EngineConfigurationError,
    NoActiveRequestError,
    NoCurrentTaskError,
    TaskAbandonedError,
    TaskProcessDiedError,
    TaskShedError,
    TaskTimeoutError,
)
from ._middleware import AfterResponseMiddleware
from ._options import Retry
from ._sqlite import SQLiteStore
from ._store import StoreError
from ._task import CurrentTask, DeadLetter, current_task
from ._version import VERSION as __version__

__all__ = [
    "AfterResponseError",
    "AfterResponseMiddleware",
    "Collector",
    "CurrentTask",
    "DeadLetter",
    "DeadLetterHook",
    "EngineConfigurationError",
    "NoActiveRequestError",
    "NoCurrentTaskError",
    "Retry",
    "SQLiteStore",
    "Stats",
    "StoreError",
    "TaskAbandonedError",
    "TaskAdder",
    "TaskProcessDiedError",
    "TaskShedError",
    "TaskTimeoutError",
    "__version__",
    "current",
    "current_task",
    "get",
    "side_effect",
]
