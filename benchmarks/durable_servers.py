"""The processes ``durable.py`` starts: ``durable_app.py`` under uvicorn, and a Redis broker.

Both listen on 127.0.0.1 only, are pinned to a CPU when asked, and are stopped by whoever
started them (a ``with`` block each).
"""

from __future__ import annotations

import importlib.util
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import _support

HERE = _support.BENCHMARKS_DIR


@contextmanager
def serve(
    server_variant: str, cpu: int | None, *options: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``durable_app.py SERVER_VARIANT OPTIONS`` under uvicorn, on a socket bound here: its
    base URL once it answers, and its process (stopped on exit if still running)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    listener.set_inheritable(True)
    base_url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    command = [sys.executable, str(HERE / "durable_app.py"), server_variant]
    command += ["--fd", str(listener.fileno()), *options]
    server = subprocess.Popen(_support.pinned(command, cpu), pass_fds=(listener.fileno(),))
    try:
        # The socket already listens: this waits in its backlog until the server is up.
        with urllib.request.urlopen(base_url + "/bench/ready", timeout=60) as response:
            response.read()
        yield base_url, server
    finally:
        stop(server)
        listener.close()


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a graceful shutdown), SIGKILL after 60 s; nothing if it has ended."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def celery_unavailable() -> str | None:
    """Why the Celery variants cannot run here, or ``None`` when they can."""
    if shutil.which("redis-server") is None:
        return "redis-server is not on PATH (Debian/Ubuntu: apt-get install redis-server)"
    if importlib.util.find_spec("celery") is None or importlib.util.find_spec("redis") is None:
        return "celery or redis is not installed (pip install -e '.[bench]')"
    return None


class RedisBroker:
    """A ``redis-server`` on a free port of 127.0.0.1 with an append-only file in
    ``directory``, for Celery's ``.delay()``; use as a context manager."""

    def __init__(self, directory: Path, cpu: int | None) -> None:
        self.directory = directory
        self.cpu = cpu
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> RedisBroker:
        import redis

        with socket.socket() as probe:  # a free port (redis-server cannot report its own)
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port)]
        command += ["--dir", str(self.directory), "--save", "", "--appendonly", "yes"]
        self._process = subprocess.Popen(
            _support.pinned(command, self.cpu), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 15
        while True:
            try:
                self._client.ping()
                return self
            except redis.ConnectionError:
                if self._process.poll() is not None:
                    stderr = self._process.stderr.read().decode() if self._process.stderr else ""
                    raise RuntimeError(f"redis-server exited at start:\n{stderr}") from None
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("redis-server did not answer PING within 15 s") from None
                time.sleep(0.02)

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            stop(self._process)
            self._process = None

    def reset(self, appendfsync: str) -> None:
        """Empty the broker and set how often its append-only file is fsynced."""
        self._client.flushall()
        self._client.config_set("appendfsync", appendfsync)

    def queued(self) -> int:
        """Messages waiting in Celery's default queue."""
        return int(self._client.llen("celery"))
