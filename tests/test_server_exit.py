"""``shutdown_timeout`` is a hard bound: on SIGTERM the server process exits, on uvicorn,
hypercorn and granian alike, whatever its side effects do (real subprocess servers).

A task that catches ``CancelledError`` and carries on is left behind once the grace passes;
a sync task blocked in its worker thread is abandoned (daemon threads do not keep the
process alive). Either way each is logged by name and the app's own shutdown runs.

And a middleware that cannot start (its store cannot be opened) fails the server's startup
in the server's default lifespan mode, saying why, rather than passing for an app without
lifespan support.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from after_response._dispatching import CANCEL_GRACE

from .exit_app import BLOCKING_NAME, FAILING_NAME, IGNORE_CANCEL_NAME, SHUTDOWN_MARKER
from .servers import bound_socket

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
TASKS = 3
SHUTDOWN_TIMEOUT = 0.5
#: Slack on top of shutdown_timeout + the grace: the server's own shutdown, interpreter exit.
MARGIN = 5.0
#: Seconds a server whose startup fails has to exit: interpreter, server and app start-up.
STARTUP_BOUND = 20.0

COMMANDS: dict[str, Callable[[int], list[str]]] = {
    "uvicorn": lambda port: [
        *("-m", "uvicorn", "tests.exit_app:app"),
        *("--host", "127.0.0.1", "--port", str(port)),
    ],
    "hypercorn": lambda port: [
        *("-m", "hypercorn", "tests.exit_app:app"),
        *("--bind", f"127.0.0.1:{port}"),
    ],
    "granian": lambda port: [
        *("-m", "granian", "--interface", "asgi"),
        *("--host", "127.0.0.1", "--port", str(port), "tests.exit_app:app"),
    ],
}


class Served:
    """A server subprocess and where its output goes."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, output: Path) -> None:
        self.process = process
        self.url = url
        self._output = output

    def stdout(self) -> str:
        return (self._output / "stdout").read_text()

    def stderr(self) -> str:
        return (self._output / "stderr").read_text()

    def get(self, path: str, timeout: float = 5) -> httpx.Response:
        return httpx.get(self.url + path, timeout=timeout)


@contextmanager
def launch(server: str, output: Path, **environ: str) -> Iterator[Served]:
    """Start ``server`` on ``tests.exit_app``, configured by ``environ`` (``EXIT_APP_...``).

    Whatever happens, the process (and anything it spawned, granian's workers) is
    SIGKILLed on the way out if it is still there.
    """
    with bound_socket() as free:
        port = free.getsockname()[1]
    env = {**os.environ, **environ, "PYTHONUNBUFFERED": "1"}
    with (output / "stdout").open("wb") as stdout, (output / "stderr").open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, *COMMANDS[server](port)],
            cwd=ROOT,
            env=env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # its own process group: the cleanup reaches its workers
        )
    try:
        yield Served(process, f"http://127.0.0.1:{port}", output)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@contextmanager
def serve(server: str, mode: str, output: Path) -> Iterator[Served]:
    """Start ``server`` on ``tests.exit_app`` in ``mode``; wait until ``/health`` answers."""
    environ = {
        "EXIT_APP_MODE": mode,
        "EXIT_APP_TASKS": str(TASKS),
        "EXIT_APP_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT),
    }
    with launch(server, output, **environ) as served:
        wait_for(lambda: _answers(served), 20, f"{server} to answer /health", served)
        yield served


def _answers(served: Served) -> bool:
    try:
        return served.get("/health").text == "ok"
    except httpx.TransportError:
        return False


def wait_for(condition: Callable[[], bool], seconds: float, what: str, served: Served) -> None:
    """Poll ``condition`` until it holds (bounded), failing early if the server died."""
    deadline = time.monotonic() + seconds
    while not condition():
        if served.process.poll() is not None:
            pytest.fail(f"the server exited while waiting for {what}:\n{served.stderr()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds}s waiting for {what}:\n{served.stderr()}")
        time.sleep(0.05)


def wait_for_exit_serving_nothing(served: Served, seconds: float) -> None:
    """Poll ``/health`` until the server exits (bounded), failing if it ever answers."""
    deadline = time.monotonic() + seconds
    while served.process.poll() is None:
        if time.monotonic() > deadline:
            pytest.fail(f"the server was still running after {seconds}s:\n{served.stderr()}")
        try:
            # Short: a server may accept connections on its socket before its startup ends.
            response = served.get("/health", timeout=0.5)
        except httpx.TransportError:
            time.sleep(0.05)
            continue
        pytest.fail(f"the server answered {response.status_code} though its startup failed")


def running(served: Served) -> int:
    stats = json.loads(served.get("/stats").text)
    assert stats["added"] == TASKS
    return int(stats["running"])


def terminate_and_wait(served: Served) -> None:
    """SIGTERM, then the process must exit within shutdown_timeout + grace + margin."""
    served.process.send_signal(signal.SIGTERM)
    bound = SHUTDOWN_TIMEOUT + CANCEL_GRACE + MARGIN
    try:
        served.process.wait(bound)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"the server was still running {bound}s after SIGTERM "
            f"(shutdown_timeout={SHUTDOWN_TIMEOUT}s):\n{served.stdout()}\n{served.stderr()}"
        )


def lines_naming(text: str, name: str, *words: str) -> list[str]:
    return [line for line in text.splitlines() if name in line and all(w in line for w in words)]


def accounted(text: str, name: str, *words: str) -> tuple[int, int]:
    """Lines about ``name`` with ``words`` written in full, and the tasks they account for
    (a summary line, "... and 2 more tasks of NAME ...", stands for its count)."""
    full = tasks = 0
    for line in lines_naming(text, name, *words):
        summary = re.search(r"\.\.\. and ([\d,]+) more tasks of ", line)
        if summary is None:
            full += 1
            tasks += 1
        else:
            tasks += int(summary.group(1).replace(",", ""))
    return full, tasks


@pytest.mark.parametrize("server", sorted(COMMANDS))
def test_a_task_ignoring_cancellation_is_left_behind_and_the_server_exits(
    server: str, tmp_path: Path
) -> None:
    with serve(server, "ignore-cancel", tmp_path) as served:
        assert served.get("/start").text == "started"
        wait_for(lambda: running(served) == TASKS, 10, "the tasks to run", served)
        terminate_and_wait(served)
        assert SHUTDOWN_MARKER in served.stdout()
        # Aggregated per name: one line in full, the others counted in a summary.
        left_behind = accounted(served.stderr(), IGNORE_CANCEL_NAME, "abandoned", "left behind")
        assert left_behind == (1, TASKS), served.stderr()


@pytest.mark.parametrize("server", sorted(COMMANDS))
def test_blocked_sync_tasks_are_abandoned_and_the_server_exits(server: str, tmp_path: Path) -> None:
    with serve(server, "blocking", tmp_path) as served:
        assert served.get("/start").text == "started"
        wait_for(lambda: running(served) == TASKS, 10, "the tasks to run", served)
        terminate_and_wait(served)
        assert SHUTDOWN_MARKER in served.stdout()
        abandoned = accounted(served.stderr(), BLOCKING_NAME, "abandoned", "shutdown_timeout")
        assert abandoned == (1, TASKS), served.stderr()


@pytest.mark.parametrize("server", sorted(COMMANDS))
def test_dead_letters_a_stuck_hook_never_got_are_logged_by_name_and_the_server_exits(
    server: str, tmp_path: Path
) -> None:
    """The hook never returns from the first dead letter: the others are given up when
    shutdown ends, by name and count, never silently, and the server exits in its bound."""
    with serve(server, "stuck-hook", tmp_path) as served:
        assert served.get("/start").text == "started"
        wait_for(
            lambda: json.loads(served.get("/stats").text)["failed"] == TASKS,
            10,
            "the tasks to fail",
            served,
        )
        terminate_and_wait(served)
        given_up = lines_naming(
            served.stderr(),
            f"{TASKS - 1} dead letter(s) never reached on_dead_letter",
            f"still busy when shutdown ended ({FAILING_NAME}: {TASKS - 1})",
        )
        assert len(given_up) == 1, served.stderr()


@pytest.mark.parametrize("wrapped", ["starlette", "no-lifespan"])
@pytest.mark.parametrize("server", sorted(COMMANDS))
def test_a_store_that_cannot_be_opened_fails_the_server_startup(
    server: str, wrapped: str, tmp_path: Path
) -> None:
    """In lifespan mode "auto" (each server's default) a failed startup of the middleware is
    the server's failed startup, whether or not the wrapped app speaks lifespan: no serving
    without the store, nor without crash recovery."""
    store = tmp_path / "no-such-directory" / "tasks.sqlite3"
    with launch(server, tmp_path, EXIT_APP_STORE=str(store), EXIT_APP_WRAPPED=wrapped) as served:
        wait_for_exit_serving_nothing(served, STARTUP_BOUND)
    output = served.stdout() + served.stderr()
    # The store's own error: the file, and what to check.
    said = lines_naming(output, "AfterResponseMiddleware could not start", str(store))
    assert [line for line in said if "does its directory exist" in line], output
    if server != "hypercorn":
        # hypercorn 0.18 exits 0 even when its worker failed: run() overwrites the worker's
        # exit code with that of a second, empty join (pgjones/hypercorn#269).
        assert served.process.returncode != 0, output


def test_an_engine_whose_settings_are_unsafe_fails_the_server_startup(tmp_path: Path) -> None:
    """Not a broker outage (the app serves on, the relay retries): a configuration that
    would lose side effects, which no retry mends."""
    annotations = '{"after_response.run": {"acks_late": false}}'
    store = tmp_path / "tasks.sqlite3"
    with launch(
        "uvicorn", tmp_path, EXIT_APP_STORE=str(store), EXIT_APP_CELERY=annotations
    ) as served:
        wait_for_exit_serving_nothing(served, STARTUP_BOUND)
    output = served.stdout() + served.stderr()
    said = lines_naming(output, "could not start: EngineConfigurationError", "acks_late=False")
    assert said, output
    assert served.process.returncode != 0, output
