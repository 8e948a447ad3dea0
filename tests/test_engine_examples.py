"""The engines example runs from the commands its README documents: a real ``redis-server``
(on a free port, given through ``REDIS_URL``), the engine's own worker command line and
uvicorn as subprocesses, and a real HTTP request; the receipt runs in the worker, the
in-process side effect in the web process.

The commands are read from ``examples/engines/README.md``, so the README cannot drift from
what runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.brokers import redis_server, wait_until
from tests.servers import bound_socket

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "examples" / "engines" / "README.md"
READY_TIMEOUT = 30.0
RECEIPT_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
EMAIL = "ada@example.com"


@dataclass(frozen=True)
class Example:
    worker: str  # how the README's worker command starts
    worker_ready: str  # what the worker prints once it consumes
    web: str  # how the README's app command starts


EXAMPLES = {
    "celery": Example(
        "celery -A examples.engines.celery_app worker",
        " ready.",
        "uvicorn examples.engines.web_celery:app",
    ),
    "taskiq": Example(
        "taskiq worker examples.engines.taskiq_broker:broker",
        "Listening started.",
        "uvicorn examples.engines.web_taskiq:app",
    ),
}


def documented(prefix: str) -> list[str]:
    """The README's shell command that starts with ``prefix``, split into arguments."""
    blocks = re.findall(r"^```bash\n(.*?)^```$", README.read_text(encoding="utf-8"), re.M | re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    found = [line for line in lines if line.startswith(prefix)]
    assert len(found) == 1, f"expected one command starting {prefix!r} in {README}, got {found}"
    return shlex.split(found[0])


def with_this_python(argv: list[str]) -> list[str]:
    """``celery ...`` as ``python -m celery ...``: the programs of this interpreter's
    environment, whatever is on PATH."""
    return [sys.executable, "-m", *argv]


def on_port(argv: list[str], port: int) -> list[str]:
    """``argv`` with its ``--port`` value replaced by ``port``."""
    index = argv.index("--port")
    return [*argv[: index + 1], str(port), *argv[index + 2 :]]


@dataclass
class Process:
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running(
    argv: list[str], log: Path, environment: Mapping[str, str], ready_line: str
) -> Iterator[Process]:
    """Run ``argv`` from the repository root in a process group of its own; yield once it
    printed ``ready_line``; SIGTERM after (SIGKILL to the group after ``STOP_TIMEOUT``)."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **environment, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started = Process(process, log)
    try:
        wait_until(
            lambda: process.poll() is not None or ready_line in started.output(),
            timeout=READY_TIMEOUT,
            waiting_for=lambda: f"{ready_line!r} from {argv[2:4]}:\n{started.output()}",
        )
        assert process.poll() is None, f"{argv[2:4]} exited early:\n{started.output()}"
        yield started
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                process.wait(STOP_TIMEOUT)
        with suppress(ProcessLookupError):  # what a stopped (or stuck) leader left behind
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def documented_purchase() -> tuple[str, dict[str, object]]:
    """The path and JSON body of the README's curl command."""
    argv = documented("curl ")
    url = next(arg for arg in argv[1:] if "/" in arg and not arg.startswith("{"))
    payload = json.loads(argv[argv.index("--json") + 1])
    return urlsplit(f"http://{url}").path, payload


@pytest.mark.parametrize("engine", sorted(EXAMPLES))
def test_engine_example_runs_the_receipt_in_the_worker_and_analytics_in_the_web_process(
    engine: str, tmp_path: Path
) -> None:
    example = EXAMPLES[engine]
    with redis_server() as redis_url:
        environment = {
            "REDIS_URL": redis_url,
            "AFTER_RESPONSE_DB": str(tmp_path / "after_response.sqlite3"),
        }
        worker_argv = with_this_python(documented(example.worker))
        with bound_socket() as probe:
            port = probe.getsockname()[1]
        web_argv = with_this_python(on_port(documented(example.web), port))
        with (
            running(
                worker_argv, tmp_path / "worker.log", environment, example.worker_ready
            ) as worker,
            running(web_argv, tmp_path / "web.log", environment, "Uvicorn running on") as web,
        ):
            path, payload = documented_purchase()
            response = httpx.post(f"http://127.0.0.1:{port}{path}", json=payload, timeout=10)
            assert response.status_code == 201, response.text
            order = response.json()["order"]

            receipt = re.compile(rf"\[receipt\] order {order}: receipt sent by pid (\d+)")
            wait_until(
                lambda: receipt.search(worker.output()) is not None,
                timeout=RECEIPT_TIMEOUT,
                waiting_for=lambda: (
                    f"the receipt of {order} in the worker's output:\n"
                    f"{worker.output()}\nweb:\n{web.output()}"
                ),
            )
            match = receipt.search(worker.output())
            assert match is not None
            assert int(match.group(1)) != web.process.pid  # it ran in a worker process
            analytics = f"[analytics] sale of {payload['item']} counted in the web process"
            wait_until(
                lambda: analytics in web.output(),
                timeout=RECEIPT_TIMEOUT,
                waiting_for=lambda: f"{analytics!r} in the app's output:\n{web.output()}",
            )
            assert f"(pid {web.process.pid})" in web.output()
            assert "[receipt]" not in web.output()  # the durable side effect left the box

            web.process.send_signal(signal.SIGTERM)
            # uvicorn ends a graceful shutdown by re-raising the signal (recent versions).
            assert web.process.wait(STOP_TIMEOUT) in (0, -signal.SIGTERM), web.output()
            assert "Application shutdown complete." in web.output()
        # The customer's address reaches neither process's output.
        assert EMAIL in json.dumps(payload)
        assert EMAIL not in worker.output()
        assert EMAIL not in web.output()
