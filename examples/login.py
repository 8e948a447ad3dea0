"""Login with a one-time code: the code is emailed after the response has gone out.

Run it (from the repository root)::

    python examples/login.py

It starts a local SMTP server (it prints each message it receives) and the app on
http://127.0.0.1:8000. Then, in another terminal::

    curl -s localhost:8000/login --json '{"email": "ada@example.com"}'           # answers at once
    curl -s localhost:8000/login-blocking --json '{"email": "ada@example.com"}'  # awaits the email
    curl -s localhost:8000/verify --json '{"email": "ada@example.com", "code": "123456"}'

``POST /login`` issues a 6-digit code, adds the email to ``request.state.after_response`` and
returns: the SMTP conversation (100-200 ms on the local server, as with a real provider) runs
after the response, in a worker thread, because ``smtplib`` blocks. ``POST /login-blocking`` is
the baseline: it awaits the same email before answering. The code is never in the response.

Environment: ``PORT`` (8000); ``SMTP_HOST`` and ``SMTP_PORT``: when ``SMTP_HOST`` is set, mail
goes to that server and no local one is started; ``MAIL_FROM``.
"""

from __future__ import annotations

import hmac
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

if not __package__:  # run as `python examples/login.py`: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from after_response import AfterResponseMiddleware, Retry, side_effect
from examples.local_servers import ReceivedMail, SMTPSink, serve, wait_for_interrupt
from examples.mail import TRANSIENT_SMTP_ERRORS, Mailer, SMTPSettings

CODE_LIFETIME = 600.0  # seconds


class CodeStore:
    """Issued codes, by email address (in memory: one process; use your database)."""

    def __init__(self) -> None:
        self._codes: dict[str, tuple[str, float]] = {}

    def issue(self, email: str) -> str:
        """A new 6-digit code for ``email``; it replaces any earlier one."""
        code = f"{secrets.randbelow(1_000_000):06d}"
        self._codes[email] = (code, time.monotonic() + CODE_LIFETIME)
        return code

    def redeem(self, email: str, code: str) -> bool:
        """Whether ``code`` is the live code of ``email``; a code works once."""
        issued, expires = self._codes.get(email, ("", 0.0))
        if not issued or time.monotonic() > expires or not hmac.compare_digest(issued, code):
            return False
        del self._codes[email]
        return True


@side_effect(
    name="send_verification_email",
    timeout=30,
    retry=Retry(attempts=3, backoff=1.0, retry_on=TRANSIENT_SMTP_ERRORS),
)
def send_verification_email(mailer: Mailer, to: str, code: str) -> None:
    """Email ``code`` to ``to`` (blocking: the middleware runs it in a worker thread)."""
    mailer.send(to, "Your verification code", f"Your code is {code}. It expires in 10 minutes.")


async def login(request: Request) -> JSONResponse:
    email = await _field(request, "email")
    if email is None:
        return JSONResponse({"error": "send {'email': ...}"}, status_code=400)
    code = request.app.state.codes.issue(email)
    request.state.after_response.add(send_verification_email, request.app.state.mailer, email, code)
    return JSONResponse({"message": f"We sent a code to {email}."})


async def login_blocking(request: Request) -> JSONResponse:
    """The baseline: the same email, awaited before the response."""
    email = await _field(request, "email")
    if email is None:
        return JSONResponse({"error": "send {'email': ...}"}, status_code=400)
    code = request.app.state.codes.issue(email)
    await anyio.to_thread.run_sync(send_verification_email, request.app.state.mailer, email, code)
    return JSONResponse({"message": f"We sent a code to {email}."})


async def verify(request: Request) -> JSONResponse:
    email, code = await _field(request, "email"), await _field(request, "code")
    if email is None or code is None or not request.app.state.codes.redeem(email, code):
        return JSONResponse({"error": "wrong or expired code"}, status_code=400)
    return JSONResponse({"message": "Logged in."})


async def _field(request: Request, name: str) -> str | None:
    try:
        payload: Any = await request.json()
    except ValueError:
        return None
    value = payload.get(name) if isinstance(payload, dict) else None
    return value if isinstance(value, str) and value else None


def create_app(
    smtp: SMTPSettings | None = None,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    **middleware_options: Any,
) -> AfterResponseMiddleware:
    """The login app, wrapped in ``AfterResponseMiddleware`` (keep the reference: it has
    ``drain()`` and ``stats()``)."""
    app = Starlette(
        routes=[
            Route("/login", login, methods=["POST"]),
            Route("/login-blocking", login_blocking, methods=["POST"]),
            Route("/verify", verify, methods=["POST"]),
        ]
    )
    app.state.codes = CodeStore()
    app.state.mailer = Mailer(smtp or SMTPSettings.from_env(), tracer_provider=tracer_provider)
    return AfterResponseMiddleware(app, tracer_provider=tracer_provider, **middleware_options)


def _print_mail(mail: ReceivedMail) -> None:
    print(f"[smtp] to {', '.join(mail.recipients)}: {mail.subject}: {mail.text.strip()}")


async def main() -> None:
    port = int(os.environ.get("PORT", "8000"))
    if os.environ.get("SMTP_HOST"):
        sink = None
        smtp = SMTPSettings.from_env()
    else:
        sink = SMTPSink(delay=(0.1, 0.2), on_message=_print_mail).start()
        smtp = SMTPSettings.from_env(host=sink.host, port=sink.port)
    try:
        async with serve(create_app(smtp), port=port) as url:
            print(f"login app on {url}; mail goes to SMTP {smtp.host}:{smtp.port}", end="")
            print(" (a local server that prints what it receives)" if sink else "")
            print(f'  curl -s {url}/login --json \'{{"email": "ada@example.com"}}\'')
            print(f'  curl -s {url}/login-blocking --json \'{{"email": "ada@example.com"}}\'')
            print(f'  curl -s {url}/verify --json \'{{"email": "ada@example.com", "code": "…"}}\'')
            print("Ctrl-C to stop (pending emails are sent first).")
            await wait_for_interrupt()
    finally:
        if sink is not None:
            sink.stop()


if __name__ == "__main__":
    anyio.run(main)
