"""The examples do what their docstrings say, against real local services: an SMTP server
(aiosmtpd) and HTTP receivers on 127.0.0.1, the app under uvicorn."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from examples import login, purchase_webhooks, signup_fanout
from examples.local_servers import Receiver, SMTPSink
from examples.mail import SMTPSettings

from .servers import serve_uvicorn

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def smtp_sink() -> Iterator[SMTPSink]:
    with SMTPSink() as sink:
        yield sink


def receivers_app(receivers: dict[str, Receiver]) -> Starlette:
    return Starlette(routes=[Route(f"/{name}", receiver) for name, receiver in receivers.items()])


def _code_in(text: str) -> str:
    match = re.search(r"\b(\d{6})\b", text)
    assert match, f"no 6-digit code in {text!r}"
    return match.group(1)


# -- login ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_login_answers_before_the_email_and_the_email_holds_a_working_code(
    smtp_sink: SMTPSink,
) -> None:
    app = login.create_app(SMTPSettings(host=smtp_sink.host, port=smtp_sink.port))
    smtp_sink.hold()  # no message can be accepted until release()
    async with serve_uvicorn(app) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/login", json={"email": "ada@example.com"})
        assert response.status_code == 200
        assert smtp_sink.messages == []  # answered while the email could not be delivered
        smtp_sink.release()
        assert await app.drain(timeout=10)

        [mail] = smtp_sink.messages
        assert mail.recipients == ["ada@example.com"]
        code = _code_in(mail.text)
        assert code not in response.text
        credentials = {"email": "ada@example.com", "code": code}
        assert (await client.post("/verify", json=credentials)).status_code == 200
        assert (await client.post("/verify", json=credentials)).status_code == 400  # used once
    assert app.stats().succeeded == 1


@pytest.mark.anyio
async def test_login_blocking_has_delivered_the_email_when_it_answers(smtp_sink: SMTPSink) -> None:
    app = login.create_app(SMTPSettings(host=smtp_sink.host, port=smtp_sink.port))
    async with serve_uvicorn(app) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/login-blocking", json={"email": "bob@example.com"})
        assert response.status_code == 200
        [mail] = smtp_sink.messages  # no drain: the request itself waited for it
        assert mail.recipients == ["bob@example.com"]
        assert _code_in(mail.text) not in response.text
    assert app.stats().added == 0


# -- signup fan-out ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_signup_fanout_isolates_a_failure_and_a_timeout_and_retries_the_flaky_service(
    smtp_sink: SMTPSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="after_response")
    services = signup_fanout.local_services()  # analytics broken, crm flaky, slack slow
    async with serve_uvicorn(receivers_app(services)) as base:
        settings = signup_fanout.Settings(
            smtp=SMTPSettings(host=smtp_sink.host, port=smtp_sink.port),
            analytics_url=f"{base}/analytics",
            crm_url=f"{base}/crm",
            slack_webhook_url=f"{base}/slack",
            slack_timeout=0.3,
        )
        app = signup_fanout.create_app(settings)
        async with serve_uvicorn(app) as url, httpx.AsyncClient(base_url=url) as client:
            response = await client.post(
                "/signup", json={"email": "ada@example.com", "name": "Ada"}
            )
            assert response.status_code == 201
            assert await app.drain(timeout=10)

    [mail] = smtp_sink.messages
    assert (mail.recipients, mail.subject) == (["ada@example.com"], "Welcome!")
    analytics, crm, slack = services["analytics"], services["crm"], services["slack"]
    assert [r.status for r in analytics.requests] == [500]
    assert [r.status for r in crm.requests] == [503, 200]
    assert crm.requests[0].json() == crm.requests[1].json()  # the retry sent the same contact
    assert [r.json()["text"] for r in slack.processed] == ["New signup: Ada"]
    assert [r.status for r in slack.requests] == [None]  # cut off by the per-call timeout

    stats = app.stats()
    assert (stats.added, stats.succeeded, stats.failed, stats.timed_out) == (4, 2, 1, 1)
    assert stats.retried == 1
    assert "analytics_beacon" in caplog.text
    assert "slack_notify" in caplog.text
    assert "ada@example.com" not in caplog.text  # task arguments never reach the logs


# -- purchase webhooks ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_purchase_webhooks_retry_with_one_idempotency_key_per_delivery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="after_response")
    subscribers = purchase_webhooks.local_subscribers()  # shop ok, ledger flaky, mailer slow
    async with serve_uvicorn(receivers_app(subscribers)) as base:
        settings = purchase_webhooks.Settings(
            subscribers=tuple(
                purchase_webhooks.Subscriber(name, f"{base}/{name}") for name in subscribers
            ),
            # Long enough for any answer on a busy machine, short enough to wait for the slow one.
            delivery_timeout=1.0,
        )
        app = purchase_webhooks.create_app(settings)
        async with serve_uvicorn(app) as url, httpx.AsyncClient(base_url=url) as client:
            orders = []
            for item in ("book", "lamp"):  # one after the other: the first meets the failures
                response = await client.post("/purchase", json={"item": item, "amount": 1200})
                assert response.status_code == 201
                orders.append(response.json()["order"])
                assert await app.drain(timeout=10)

    keys: set[str] = set()
    for name, subscriber in subscribers.items():
        # Each event acted upon exactly once by each subscriber, in order.
        assert [r.json()["data"]["order"] for r in subscriber.processed] == orders, name
        attempts: dict[str, list[int | None]] = {}
        for received in subscriber.requests:
            key = received.headers["idempotency-key"]
            attempts.setdefault(key, []).append(received.status)
        assert len(attempts) == 2, name  # one key per delivery, the same on every attempt
        keys |= attempts.keys()
        first, second = attempts.values()
        assert second == [200], name
        assert first == {"shop": [200], "ledger": [503, 200], "mailer": [None, 200]}[name]
    assert len(keys) == 6  # a different key per subscriber and per event
    mailer_first_retry = subscribers["mailer"].requests[1]
    assert (
        mailer_first_retry.headers["idempotency-key"]
        == (subscribers["mailer"].requests[0].headers["idempotency-key"])
    )
    # The mailer recognised the retry by its key; nobody else saw a key twice.
    assert subscribers["mailer"].duplicates == [mailer_first_retry]
    assert subscribers["shop"].duplicates == subscribers["ledger"].duplicates == []
    # Each retry warning names the subscriber whose delivery failed.
    retried = [
        getattr(r, "task_name", None) for r in caplog.records if r.levelno == logging.WARNING
    ]
    assert sorted(retried) == ["deliver_webhook[ledger]", "deliver_webhook[mailer]"]

    stats = app.stats()
    assert (stats.added, stats.succeeded, stats.failed, stats.timed_out) == (6, 6, 0, 0)
    assert stats.retried == 2


def test_webhook_subscribers_are_named_in_the_environment_or_after_their_host() -> None:
    parse = purchase_webhooks.Subscriber.parse
    assert parse("ledger=https://hooks.example/l") == purchase_webhooks.Subscriber(
        "ledger", "https://hooks.example/l"
    )
    assert parse("https://crm.example/hook?token=t").name == "crm.example"  # never the path
    with pytest.raises(ValueError, match="name=URL"):
        parse("ledger")


# -- each example runs with one command ----------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "path", "payload", "printed"),
    [
        ("login.py", "/login", {"email": "ada@example.com"}, ["[smtp] to ada@example.com"]),
        ("signup_fanout.py", "/signup", {"email": "a@example.com", "name": "A"}, ["[crm] PUT #2"]),
        (
            "purchase_webhooks.py",
            "/purchase",
            {"item": "book", "amount": 1},
            [
                "[ledger] POST #2",
                "deliver_webhook[ledger]",  # the retry warning names the subscriber
                "duplicate, recognised by its key: not processed again",  # the mailer's retry
            ],
        ),
    ],
)
def test_example_runs_with_one_command_and_finishes_its_side_effects_on_sigterm(
    script: str, path: str, payload: dict[str, object], printed: list[str]
) -> None:
    environment = {
        **os.environ,
        "PORT": "0",
        "PYTHONUNBUFFERED": "1",
        "SLACK_TIMEOUT": "0.5",
        "DELIVERY_TIMEOUT": "1",
    }
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / script)],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(30, process.kill)
    watchdog.start()
    try:
        assert process.stdout is not None
        first_line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+", first_line)
        assert match, first_line
        response = httpx.post(match.group(0) + path, json=payload)
        assert response.status_code in (200, 201)
        process.terminate()  # SIGTERM: graceful shutdown drains the side effects first
        output = first_line + process.stdout.read()
        assert process.wait() == 0, output
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()
    for line in printed:
        assert line in output
