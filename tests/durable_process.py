"""Real uvicorn processes of :mod:`tests.durable_app` for the crash tests, the clients that
load them, and bounded polls (never a sleep that waits for something to have happened)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import anyio
import httpx

from after_response import SQLiteStore
from after_response._store import UNFINISHED, StoredTask

from .servers import bound_socket

ROOT = Path(__file__).parent.parent
#: Seconds between two looks of a bounded poll.
POLL_INTERVAL = 0.02


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Look at ``condition`` until it is true; ``AssertionError`` naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(POLL_INTERVAL)


async def until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """:func:`wait_until` for async tests: the event loop runs between two looks."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await anyio.sleep(POLL_INTERVAL)


def _limit_file_size(limit: int) -> None:
    """In the child before exec: writes past ``limit`` bytes fail with EFBIG (no signal)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


class ServerProcess:
    """``python -m uvicorn tests.durable_app:app`` on a socket bound here (127.0.0.1, a free
    port, no race for it), its output collected by a thread (a pipe, not a file: a file
    would count against a file-size limit)."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        file_size_limit: int | None = None,
        app: str = "tests.durable_app:app",
    ) -> None:
        sock = bound_socket()
        sock.listen(128)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        descriptor = sock.fileno()
        command = [sys.executable, "-m", "uvicorn", app, "--lifespan", "on"]
        self.process = subprocess.Popen(
            [*command, "--fd", str(descriptor), "--log-level", "warning", "--no-access-log"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            pass_fds=[descriptor],
            preexec_fn=None
            if file_size_limit is None
            else lambda: _limit_file_size(file_size_limit),
        )
        # The server holds the only listening descriptor: once it dies, connects are refused
        # rather than left waiting in a backlog nobody accepts from.
        sock.close()
        self.pid = self.process.pid
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.append(line)

    @property
    def output(self) -> str:
        """Everything the server printed so far (uvicorn's lines and the app's log)."""
        return "".join(self._lines)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll ``GET /stats`` until it answers (lifespan startup is done by then)."""

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the server exited ({self.process.returncode}):\n{self.output}"
                )
            try:
                return httpx.get(f"{self.url}/stats", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout, f"the server answers at {self.url}:\n{self.output}")

    def stats(self) -> dict[str, int]:
        """The middleware's counts, from ``GET /stats``."""
        stats: dict[str, int] = httpx.get(f"{self.url}/stats", timeout=5.0).json()
        return stats

    def kill(self) -> None:
        """``kill -9``, and wait until the process is gone."""
        os.kill(self.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 20.0) -> None:
        """SIGTERM: uvicorn's graceful shutdown (lifespan shutdown included), which must end
        without an error of uvicorn's own. Uvicorn re-raises the signal once it is done."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        assert code in (0, -signal.SIGTERM), f"exit code {code}:\n{self.output}"
        assert not any(line.startswith("ERROR:") for line in self._lines), self.output

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextmanager
def running(
    env: Mapping[str, str],
    *,
    file_size_limit: int | None = None,
    app: str = "tests.durable_app:app",
) -> Iterator[ServerProcess]:
    """A started server (not yet ready: call ``wait_ready``), killed on exit if still alive."""
    server = ServerProcess(env, file_size_limit=file_size_limit, app=app)
    try:
        yield server
    finally:
        server.close()


@dataclass
class Load:
    """Keep-alive clients posting distinct orders, and what each request got."""

    path: str = "/checkout"
    orders: Iterator[int] = field(default_factory=lambda: count(1))
    #: Orders whose response was a complete 2xx, with the server that gave it.
    completed: dict[int, str] = field(default_factory=dict)
    #: Orders answered otherwise (status code and Retry-After header).
    refused: dict[int, tuple[int, str | None]] = field(default_factory=dict)
    #: Orders whose request failed (the server died under it), with no response.
    failed: set[int] = field(default_factory=set)
    stop: anyio.Event = field(default_factory=anyio.Event)

    async def client(self, url: str) -> None:
        """Post one order after another on one connection until :attr:`stop` is set or
        the server goes away."""
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10.0) as client:
            while not self.stop.is_set():
                order = next(self.orders)
                try:
                    response = await client.post(f"{self.path}?order={order}")
                except httpx.TransportError:
                    self.failed.add(order)
                    return
                if response.is_success:
                    self.completed[order] = url
                else:
                    self.refused[order] = (
                        response.status_code,
                        response.headers.get("retry-after"),
                    )


async def unfinished(db: Path) -> dict[str, StoredTask]:
    """The tasks the store holds unfinished (to run, or run again), by id."""
    store = SQLiteStore(db)
    await store.open(f"test-reader-{os.getpid()}")
    try:
        rows = store.list(limit=1_000_000)
    finally:
        await store.close()
    return {row.id: row for row in rows if row.state in UNFINISHED}
