"""Sending email with the standard library's ``smtplib``: one SMTP conversation per message.

``smtplib`` blocks, which is fine in a side effect: ``AfterResponseMiddleware`` runs plain
(non-async) functions in a worker thread of its own, never on the event loop.
"""

from __future__ import annotations

import os
import smtplib
from dataclasses import dataclass
from email.message import EmailMessage

from opentelemetry import trace
from opentelemetry.trace import SpanKind

#: Failures worth another attempt: the message cannot have been accepted yet.
TRANSIENT_SMTP_ERRORS = (ConnectionError, smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected)


@dataclass(frozen=True)
class SMTPSettings:
    """Where mail goes. ``from_env()`` reads ``SMTP_HOST``, ``SMTP_PORT`` and ``MAIL_FROM``."""

    host: str = "127.0.0.1"
    port: int = 8025
    sender: str = "no-reply@example.com"
    #: Seconds each socket operation may take: a blocking call must not hang a thread forever.
    timeout: float = 10.0

    @classmethod
    def from_env(cls, **overrides: object) -> SMTPSettings:
        values: dict[str, object] = {
            "host": os.environ.get("SMTP_HOST", cls.host),
            "port": int(os.environ.get("SMTP_PORT", cls.port)),
            "sender": os.environ.get("MAIL_FROM", cls.sender),
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


class Mailer:
    """Sends plain-text mail through one SMTP server, one conversation per message."""

    def __init__(
        self, settings: SMTPSettings, *, tracer_provider: trace.TracerProvider | None = None
    ) -> None:
        self.settings = settings
        self._tracer = trace.get_tracer("examples.mail", tracer_provider=tracer_provider)

    def send(self, to: str, subject: str, text: str) -> None:
        """Send one message; blocks for the whole SMTP conversation.

        Raises:
            OSError: ``smtplib.SMTPException`` (a subclass) when the server refuses it,
                ``ConnectionError`` when it cannot be reached.
        """
        settings = self.settings
        message = EmailMessage()
        message["From"] = settings.sender
        message["To"] = to
        message["Subject"] = subject
        message.set_content(text)
        # A span for the conversation (never the address or the text: they are personal).
        with (
            self._tracer.start_as_current_span(
                "smtp send",
                kind=SpanKind.CLIENT,
                attributes={"server.address": settings.host, "server.port": settings.port},
            ),
            smtplib.SMTP(settings.host, settings.port, timeout=settings.timeout) as client,
        ):
            client.send_message(message)
