"""after-response: run a request's side effects after its response has gone out.

Concurrent and bounded, each in its own OpenTelemetry span, with timeouts, retries,
logged failures and a graceful drain at shutdown::

    from after_response import AfterResponseMiddleware

    app = AfterResponseMiddleware(app)

    async def login(request):
        request.state.after_response.add(send_verification_email, user.email, code)
        return JSONResponse({"message": "Code sent"})
"""

from ._collector import Collector, TaskAdder, current
from ._errors import NoActiveRequestError, TaskAbandonedError, TaskShedError, TaskTimeoutError
from ._executor import DeadLetterHook, Stats
from ._middleware import AfterResponseMiddleware
from ._options import Retry, side_effect
from ._version import VERSION as __version__

__all__ = [
    "AfterResponseMiddleware",
    "Collector",
    "DeadLetterHook",
    "NoActiveRequestError",
    "Retry",
    "Stats",
    "TaskAbandonedError",
    "TaskAdder",
    "TaskShedError",
    "TaskTimeoutError",
    "__version__",
    "current",
    "side_effect",
]
