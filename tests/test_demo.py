"""The demo (``./demo.sh``) measures and prints what the README promises, in a quick run."""

from __future__ import annotations

import pytest
from opentelemetry.trace import SpanKind

from examples import demo


@pytest.mark.anyio
async def test_demo_prints_latencies_nothing_lost_and_the_side_effect_under_the_request() -> None:
    lines: list[str] = []
    result = await demo.run_demo(logins=8, rate=100.0, write=lines.append)
    output = "\n".join(lines)

    assert "median" in output
    assert "p99" in output
    assert "speed-up" in output
    assert "POST /login-blocking" in output
    assert "POST /login " in output
    assert len(result.blocking) == len(result.after_response) == 8
    assert result.emails_sent == 8 + 8 + 1
    assert result.emails_received == result.emails_sent
    assert f"Emails: {result.emails_sent} sent, {result.emails_sent} received" in output

    server, *rest = result.trace
    assert server.kind is SpanKind.SERVER
    assert server.context is not None
    [effect] = [span for span in rest if span.name == "after_response send_verification_email"]
    assert effect.parent is not None
    assert effect.parent.span_id == server.context.span_id
    assert effect.attributes is not None
    assert effect.attributes["after_response.task.outcome"] == "succeeded"
    assert "after_response send_verification_email" in output


def test_demo_command_prints_the_table_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--logins", "4", "--rate", "100"]) == 0
    output = capsys.readouterr().out
    assert "speed-up" in output
    assert "Emails: 9 sent, 9 received by the SMTP server: none lost." in output
