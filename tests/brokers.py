"""Real brokers and real workers for the engine tests: Redis, Celery workers, taskiq workers.

- ``redis_server()`` runs Debian's ``redis-server`` on a free port of 127.0.0.1, without
  persistence, and yields its URL.
- ``celery_worker()`` and ``taskiq_worker()`` start the engines' own worker command lines as
  subprocesses (in a process group of their own, so that ``Worker.kill()`` takes their children
  with them) and yield once the worker consumes.
- ``read_ledger()`` and ``wait_until()`` read what the test apps' tasks wrote
  (``tests/engine_apps``), with a bounded poll.

Without ``redis-server`` the tests skip, except under CI (``CI=true``), which installs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.engine_apps import BROKER_URL_ENV, LEDGER_ENV

ROOT = Path(__file__).resolve().parent.parent
STOP_TIMEOUT = 10.0
READY_TIMEOUT = 30.0
POLL_INTERVAL = 0.02


def require_program(name: str) -> str:
    """The path of program ``name``; skips the test without it, fails it under CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not on PATH; install Debian's {name} package (apt-get install {name})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}: CI must install it")
        pytest.skip(message)
    return path


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    waiting_for: Callable[[], str],
    interval: float = POLL_INTERVAL,
) -> None:
    """Poll ``condition`` every ``interval`` seconds until it holds; ``TimeoutError`` naming
    ``waiting_for()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"still waiting after {timeout} s for {waiting_for()}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no output)"


def _stop(process: subprocess.Popen[bytes], *, group: bool, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL (to the whole group when ``group``) after ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    if group:
        # Children a killed parent left behind (prefork children, taskiq's worker process).
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextmanager
def redis_server(port: int | None = None) -> Iterator[str]:
    """Run ``redis-server`` on ``port`` (default: a free one) of 127.0.0.1 (no RDB, no AOF)
    in a temporary directory; yields ``redis://127.0.0.1:PORT/0`` once it answers PING;
    stops it after."""
    executable = require_program("redis-server")
    with tempfile.TemporaryDirectory(prefix="after-response-redis-") as directory:
        port = port or free_port()
        log = Path(directory) / "redis.log"
        command = [executable, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
        command += ["--appendonly", "no", "--dir", directory, "--logfile", str(log)]
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        try:
            wait_until(
                lambda: process.poll() is not None or _answers_ping(port),
                timeout=READY_TIMEOUT,
                waiting_for=lambda: f"redis-server on port {port} to answer PING",
            )
            if process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with status {process.returncode}:\n{_tail(log)}"
                )
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            _stop(process, group=False)


@dataclass
class Worker:
    """A running worker command line: its process (the group leader) and its output file."""

    process: subprocess.Popen[bytes]
    log: Path
    stop_timeout: float = STOP_TIMEOUT

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        """Everything the worker printed so far (stdout and stderr)."""
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the worker as the fixture does (SIGTERM, then SIGKILL after its stop
        timeout); its output stays readable until the fixture ends."""
        _stop(self.process, group=True, timeout=self.stop_timeout)

    def kill(self) -> None:
        """``kill -9`` the worker and every process it started; returns once it is reaped."""
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@contextmanager
def _worker(
    command: list[str],
    *,
    ready_line: str,
    broker_url: str,
    ledger: Path | None,
    environment: Mapping[str, str] | None,
    stop_timeout: float = STOP_TIMEOUT,
) -> Iterator[Worker]:
    env = {**os.environ, BROKER_URL_ENV: broker_url, "PYTHONUNBUFFERED": "1"}
    if ledger is not None:
        env[LEDGER_ENV] = str(ledger)
    env.update(environment or {})
    with tempfile.TemporaryDirectory(prefix="after-response-worker-") as directory:
        log = Path(directory) / "worker.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(process, log, stop_timeout)
        try:
            wait_until(
                lambda: process.poll() is not None or ready_line in worker.output(),
                timeout=READY_TIMEOUT,
                waiting_for=lambda: f"{ready_line!r} from {command[2:5]}:\n{_tail(log)}",
            )
            if process.poll() is not None:
                raise RuntimeError(
                    f"{' '.join(command[2:5])} exited with status {process.returncode} "
                    f"before it was ready:\n{_tail(log)}"
                )
            yield worker
        finally:
            _stop(process, group=True, timeout=stop_timeout)


@contextmanager
def celery_worker(
    app_module: str,
    broker_url: str,
    *,
    ledger: Path | None = None,
    pool: str = "solo",
    concurrency: int = 1,
    environment: Mapping[str, str] | None = None,
) -> Iterator[Worker]:
    """Run ``python -m celery -A app_module worker`` with ``broker_url`` (and ``ledger``) in
    its environment; yields once it logs that it is ready, stops it after (warm shutdown,
    then SIGKILL)."""
    command = [sys.executable, "-m", "celery", "-A", app_module, "worker"]
    command += [f"--pool={pool}", f"--concurrency={concurrency}", "--loglevel=INFO"]
    # A unique node name, and no waiting for replies from other nodes at start-up.
    command += ["--hostname", f"test-{uuid.uuid4().hex[:8]}@%h"]
    command += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    with _worker(
        command,
        ready_line=" ready.",
        broker_url=broker_url,
        ledger=ledger,
        environment=environment,
    ) as worker:
        yield worker


@contextmanager
def taskiq_worker(
    broker_spec: str,
    broker_url: str,
    *,
    ledger: Path | None = None,
    environment: Mapping[str, str] | None = None,
    max_async_tasks: int | None = None,
) -> Iterator[Worker]:
    """Run ``python -m taskiq worker broker_spec`` (one worker process, running at most
    ``max_async_tasks`` tasks at once: taskiq's default, 100, when ``None``) with
    ``broker_url`` (and ``ledger``) in its environment; yields once it listens, stops it after.

    The stop is SIGTERM, then SIGKILL after 2 s: with a ``RedisStreamBroker`` the worker
    (taskiq 0.13, taskiq-redis 1.2.4) stops fetching on SIGTERM but never exits.
    """
    command = [sys.executable, "-m", "taskiq", "worker", broker_spec]
    command += ["--workers", "1", "--log-level", "INFO"]
    if max_async_tasks is not None:
        command += ["--max-async-tasks", str(max_async_tasks)]
    with _worker(
        command,
        ready_line="Listening started.",
        broker_url=broker_url,
        ledger=ledger,
        environment=environment,
        stop_timeout=2.0,
    ) as worker:
        yield worker


class LedgerLine(NamedTuple):
    """One line a test app's task wrote: ``started`` or ``done``, the test's entry, the
    engine's task id and the worker process id."""

    event: str
    entry: str
    task_id: str
    pid: int


def _complete_lines(ledger: Path) -> list[list[str]]:
    """The fields of the ledger's complete lines, oldest first (none before it exists)."""
    try:
        text = ledger.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line.split() for line in text.splitlines(keepends=True) if line.endswith("\n")]


def read_ledger(ledger: Path) -> list[LedgerLine]:
    """The ledger's complete lines, oldest first (none when the file does not exist yet)."""
    return [
        LedgerLine(event, entry, task_id, int(pid))
        for event, entry, task_id, pid in _complete_lines(ledger)
    ]


def wait_for_ledger(
    ledger: Path, event: str, entry: str, *, count: int = 1, timeout: float = 20.0
) -> list[LedgerLine]:
    """Poll until ``count`` lines of ``event`` for ``entry`` are in the ledger; returns the
    whole ledger then."""
    wait_until(
        lambda: sum(1 for line in read_ledger(ledger) if line[:2] == (event, entry)) >= count,
        timeout=timeout,
        waiting_for=lambda: f"{count} x {event!r} {entry!r} in {read_ledger(ledger)}",
    )
    return read_ledger(ledger)


class EffectLine(NamedTuple):
    """One line a side effect of :mod:`tests.engine_apps.effects` (or an engine test app's
    dead-letter hook) wrote: ``EVENT ENTRY TASK_ID PID ATTEMPT``."""

    event: str
    entry: str
    task_id: str
    pid: int
    attempt: int


def read_effects(ledger: Path) -> list[EffectLine]:
    """The ledger's complete lines, oldest first (none when the file does not exist yet)."""
    return [
        EffectLine(event, entry, task_id, int(pid), int(attempt))
        for event, entry, task_id, pid, attempt in _complete_lines(ledger)
    ]


def wait_for_effect(
    ledger: Path, event: str, entry: str, *, count: int = 1, timeout: float = 20.0
) -> list[EffectLine]:
    """The ledger's lines of ``entry``, once ``count`` of them are ``event``."""

    def of_entry() -> list[EffectLine]:
        return [line for line in read_effects(ledger) if line.entry == entry]

    wait_until(
        lambda: sum(1 for line in of_entry() if line.event == event) >= count,
        timeout=timeout,
        waiting_for=lambda: f"{count} x {event!r} {entry!r} in {read_effects(ledger)}",
    )
    return of_entry()


def assert_one_failure_line_and_a_count(output: str, name: str, burst: int) -> None:
    """A worker's ``output`` after a ``burst`` of ``flaky_effect`` failures of side effect
    ``name``: one line in full with its traceback, the others counted in one summary."""
    assert output.count("failed after 1 attempt(s)") == 1, output
    assert output.count("RuntimeError: flaky_effect failed on purpose") == 1  # one traceback
    assert f"... and {burst - 1} more tasks of {name} in the last " in output
    assert ": failed (RuntimeError)" in output
