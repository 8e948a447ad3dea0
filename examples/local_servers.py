"""Local stand-ins for the services the examples talk to, all on 127.0.0.1.

- :class:`SMTPSink`: a real SMTP server (aiosmtpd) in a thread of its own that keeps every
  message it accepts. It can take its time like a real provider (``delay``), and can be held
  (:meth:`SMTPSink.hold`), so a test can show that a response left while its email could not
  have been delivered yet.
- :class:`Receiver`: an HTTP endpoint standing in for a third-party service (analytics, CRM,
  chat webhook, webhook subscriber): it records each request and answers as told.
- :func:`serve`: uvicorn in the current event loop, shut down gracefully on exit.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import random
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any, Final

import anyio
import uvicorn
from aiosmtpd.controller import Controller
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

#: ``Receiver(slow_first=ALWAYS)``: every request is slow.
ALWAYS: Final = 1 << 62


def bound_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one), ready to listen."""
    # proto=IPPROTO_TCP, not the default 0: asyncio only sets TCP_NODELAY on the connections
    # of a socket that says it is TCP, and without it every response waits ~40 ms (Nagle's
    # algorithm against the client's delayed ACK).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


# -- SMTP ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedMail:
    """A message the SMTP sink accepted."""

    sender: str
    recipients: list[str]
    message: EmailMessage

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    @property
    def text(self) -> str:
        body = self.message.get_body(preferencelist=("plain",))
        return str(body.get_content()) if body is not None else ""


class SMTPSink:
    """An SMTP server on 127.0.0.1 that keeps the messages it accepts (aiosmtpd).

    Use it as a context manager; it runs its own event loop in a thread, so it serves the
    blocking ``smtplib`` clients of worker threads and async clients alike::

        with SMTPSink(delay=(0.1, 0.2)) as sink:      # 100-200 ms per message, like a provider
            ...                                       # send mail to 127.0.0.1:sink.port
            print(sink.messages)

    Args:
        host, port: where to listen (port 0: a free port; read it from ``sink.port``).
        delay: each message is accepted after a random delay between these two numbers
            of seconds, the time a real provider takes to answer ``DATA``.
        on_message: called (in the sink's thread) with each message it accepts.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        delay: tuple[float, float] = (0.0, 0.0),
        on_message: Callable[[ReceivedMail], object] | None = None,
    ) -> None:
        self._sock = bound_socket(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        self.delay = delay
        self._on_message = on_message
        self._messages: list[ReceivedMail] = []
        self._lock = threading.Lock()
        self._gate = asyncio.Event()  # bound to the sink's loop on first wait
        self._gate.set()
        self._controller = _Controller(_Handler(self), self._sock)

    @property
    def messages(self) -> list[ReceivedMail]:
        """The messages accepted so far, oldest first (a copy)."""
        with self._lock:
            return list(self._messages)

    def hold(self) -> None:
        """Keep every conversation waiting before its message is accepted, until release()."""
        self._gate.clear()  # a flag: conversations only read it on the sink's loop

    def release(self) -> None:
        """Let held conversations (and later ones) go on."""
        self._controller.loop.call_soon_threadsafe(self._gate.set)

    def start(self) -> SMTPSink:
        try:
            self._controller.start()
        except BaseException:
            self._sock.close()
            raise
        return self

    def stop(self) -> None:
        self.release()
        self._controller.stop()

    def __enter__(self) -> SMTPSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _accept(self, mail: ReceivedMail) -> None:
        with self._lock:
            self._messages.append(mail)
        if self._on_message is not None:
            self._on_message(mail)


class _Handler:
    """aiosmtpd's handler protocol: called for each stage of each conversation."""

    def __init__(self, sink: SMTPSink) -> None:
        self._sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        sink = self._sink
        await sink._gate.wait()
        low, high = sink.delay
        if high > 0:
            await asyncio.sleep(random.uniform(low, high))  # the provider's own latency
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        sink._accept(ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"


class _Controller(Controller):
    """aiosmtpd's threaded controller, listening on a socket bound beforehand (so port 0
    works: the controller itself connects to its port to check that it is up)."""

    def __init__(self, handler: _Handler, sock: socket.socket) -> None:
        host, port = sock.getsockname()[:2]
        # server_hostname: otherwise each conversation starts with socket.getfqdn(), a DNS
        # lookup that takes seconds on a machine without working DNS.
        super().__init__(handler, hostname=host, port=port, server_hostname="localhost")
        self._sock = sock

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, sock=self._sock)


# -- HTTP receivers ------------------------------------------------------------------------------


@dataclass
class ReceivedRequest:
    """One request a :class:`Receiver` got, and what it answered."""

    method: str
    headers: dict[str, str]
    body: bytes
    #: The status it answered; ``None`` if the client went away before the answer.
    status: int | None = None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP endpoint standing in for a third-party service (a plain ASGI app).

    It records every request in ``requests``, then answers, in this order:

    - a request whose ``Idempotency-Key`` it has already processed: 200, not processed again
      (recorded in ``duplicates``, and echoed as a duplicate);
    - the first ``fail_first`` requests: 503, not processed (a service having a bad moment);
    - when ``status`` is an error: ``status``, not processed (a broken service);
    - otherwise it processes the request (``processed``) and answers 200, except that for the
      first ``slow_first`` requests (``ALWAYS``: all of them) it keeps the client waiting, for
      up to ``slow_for`` seconds or until the client gives up (a slow service).

    Serve several on one server with Starlette routes: ``Route("/crm", Receiver(...))``.
    """

    status: int = 200
    fail_first: int = 0
    slow_first: int = 0
    slow_for: float = 30.0
    #: Print a line for each request answered (for the interactive examples).
    echo: str | None = None
    requests: list[ReceivedRequest] = field(default_factory=list, init=False)
    #: The requests it acted upon, once per idempotency key.
    processed: list[ReceivedRequest] = field(default_factory=list, init=False)
    #: The requests it recognised by an idempotency key already processed, and did not act upon.
    duplicates: list[ReceivedRequest] = field(default_factory=list, init=False)
    _processed_keys: set[str] = field(default_factory=set, init=False, repr=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http", "a Receiver only answers HTTP requests"
        request = Request(scope, receive)
        received = ReceivedRequest(
            method=request.method, headers=dict(request.headers), body=await request.body()
        )
        self.requests.append(received)
        number = len(self.requests)
        key = received.headers.get("idempotency-key")
        answer: dict[str, object]
        duplicate = key is not None and key in self._processed_keys
        if duplicate:
            self.duplicates.append(received)
            status, answer = 200, {"ok": True, "duplicate": True}
        elif number <= self.fail_first:
            status, answer = 503, {"error": "temporarily unavailable"}
        elif self.status >= 400:
            status, answer = self.status, {"error": "internal error"}
        else:
            self.processed.append(received)
            if key is not None:
                self._processed_keys.add(key)
            status, answer = 200, {"ok": True}
            if number <= self.slow_first and await _client_leaves(receive, self.slow_for):
                self._echo(received, "the client gave up waiting")
                return
        received.status = status
        if duplicate:
            self._echo(
                received,
                f"duplicate, recognised by its key: not processed again, answered {status}",
            )
        else:
            self._echo(received, f"answered {status}")
        await JSONResponse(answer, status_code=status)(scope, receive, send)

    def _echo(self, received: ReceivedRequest, what: str) -> None:
        if self.echo is not None:
            key = received.headers.get("idempotency-key")
            print(f"[{self.echo}] {received.method} #{len(self.requests)}", end="")
            print(f" (Idempotency-Key {key})" if key else "", f"{what}")


async def _client_leaves(receive: Receive, within: float) -> bool:
    """Wait up to ``within`` seconds for the client to disconnect; whether it did."""
    with anyio.move_on_after(within):
        while (await receive())["type"] != "http.disconnect":
            pass
        return True
    return False


# -- serving -------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn, reporting readiness on an event and leaving signals to the caller (several
    servers share one process and one Ctrl-C)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = anyio.Event()

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@asynccontextmanager
async def serve(app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn in this event loop; yields its base URL.

    On exit the server shuts down gracefully: it finishes open requests, then runs lifespan
    shutdown, where ``AfterResponseMiddleware`` drains its side effects.
    """
    sock = bound_socket(host, port)
    server = _Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    try:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(server.serve, [sock])
            with anyio.fail_after(10):
                await server.ready.wait()
            try:
                yield f"http://{host}:{sock.getsockname()[1]}"
            finally:
                server.should_exit = True
    finally:
        sock.close()


async def wait_for_interrupt() -> None:
    """Return on Ctrl-C or SIGTERM."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return
