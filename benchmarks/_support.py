"""Helpers shared by the benchmark scripts: statistics, tables, the machine, wrk, memory,
and a minimal in-process ASGI "server" (lifespan and fake requests) and the floors (the
least a middleware could do) for the in-process benchmarks.

The scripts import this module as a sibling (``python benchmarks/NAME.py`` puts
``benchmarks/`` first on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

BENCHMARKS_DIR = Path(__file__).resolve().parent

# -- statistics --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated; NaN if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Iterable[float]) -> float:
    """The median, NaN for no values."""
    values = list(values)
    return statistics.median(values) if values else float("nan")


# -- output ------------------------------------------------------------------------------------


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print a GitHub-flavoured Markdown table (readable in a terminal, pasteable in docs)."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    print(f"### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    print()


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def print_targets(targets: Iterable[tuple[str, str, bool | None]]) -> None:
    """Print one line per target: what it is, the measured ratio, and whether it holds."""
    print("Targets:\n")
    for description, measured, holds in targets:
        verdict = "n/a" if holds is None else ("holds" if holds else "MISSED")
        print(f"- {description}: {measured} — **{verdict}**")
    print()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def print_machine(info: dict[str, Any] | None = None) -> None:
    info = info or machine()
    print(
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable), "
        f"Python {info['python']}, {info['system']}, {info['date']}\n"
    )


def pin_to_cpu(cpu: int | None) -> int | None:
    """Pin this process to one CPU (``None``: the last usable one); returns it, or ``None``
    when pinning is not possible here."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
        chosen = allowed[-1] if cpu is None else cpu
        os.sched_setaffinity(0, {chosen})
    except (AttributeError, OSError):
        return None
    return chosen


# -- real servers and wrk ----------------------------------------------------------------------


def pinned(command: list[str], cpu: int | None) -> list[str]:
    """``command``, run on CPU ``cpu`` only (with ``taskset``, when there is one)."""
    if cpu is None or shutil.which("taskset") is None:
        return command
    return ["taskset", "-c", str(cpu), *command]


def post(base_url: str, path: str, timeout: float) -> Any:
    """POST an empty body; the answer, parsed if it is JSON."""
    request = urllib.request.Request(base_url + path, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body.startswith(b"{") else body.decode()


def run_wrk(
    url: str, seconds: float, script: Path, connections: int, threads: int, cpu: int | None
) -> dict[str, Any]:
    """Run wrk with ``script``, which prints one ``WRK_RESULT {json}`` line; that JSON, with
    the count of non-2xx/3xx responses as ``non_2xx``."""
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    completed = subprocess.run(pinned(command, cpu), capture_output=True, text=True, check=True)
    match = re.search(r"^WRK_RESULT (\{.*\})$", completed.stdout, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{completed.stdout}\n{completed.stderr}")
    result: dict[str, Any] = json.loads(match.group(1))
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", completed.stdout)
    result["non_2xx"] = int(match.group(1)) if match else 0
    return result


# -- memory ------------------------------------------------------------------------------------


def proc_status_kib(field: str, pid: int | str = "self") -> int:
    """A ``kB`` field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``...), in KiB; 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_mib(pid: int | str = "self") -> float:
    return proc_status_kib("VmRSS", pid) / 1024


def peak_rss_mib(pid: int | str = "self") -> float:
    return proc_status_kib("VmHWM", pid) / 1024


# -- an in-process ASGI "server" -----------------------------------------------------------------

SCOPE_TEMPLATE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"127.0.0.1"), (b"user-agent", b"bench")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}

_REQUEST_MESSAGE: Message = {"type": "http.request", "body": b"", "more_body": False}


def http_scope(path: str = "/", **extra: Any) -> dict[str, Any]:
    """A fresh request scope, with a fresh (empty) lifespan ``state`` copy as uvicorn passes."""
    return {**SCOPE_TEMPLATE, "path": path, "raw_path": path.encode(), "state": {}, **extra}


async def receive_request() -> Message:
    """``receive`` for a request with an empty body (never blocks)."""
    return _REQUEST_MESSAGE


async def discard_send(message: Message) -> None:
    """``send`` that drops the response, as a server with an instant socket would."""


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run ``app``'s lifespan (startup on enter, shutdown on exit), as a server does."""
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
    running: Any = app(scope, to_app.get, from_app.put)  # an ASGI app's call is a coroutine
    task: asyncio.Task[None] = asyncio.create_task(running)

    async def expect(kind: str) -> None:
        getter = asyncio.ensure_future(from_app.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            task.result()  # raises the app's error, if any
            raise RuntimeError(f"the app's lifespan ended before {kind}")
        message = getter.result()
        if message["type"] != kind:
            raise RuntimeError(f"lifespan: expected {kind}, got {message}")

    await to_app.put({"type": "lifespan.startup"})
    await expect("lifespan.startup.complete")
    try:
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        await expect("lifespan.shutdown.complete")
        await task


class Completion:
    """Counts finished side effects and wakes a waiter when an expected number is reached."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self._event = asyncio.Event()

    def expect(self, target: int) -> None:
        self.count = 0
        self.target = target
        self._event = asyncio.Event()
        if target == 0:
            self._event.set()

    def tick(self) -> None:
        self.count += 1
        if self.count == self.target:
            self._event.set()

    async def wait(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


def main_guard(run: Callable[[], int | None]) -> None:
    """Run a benchmark's ``main`` and exit with its status."""
    sys.exit(run() or 0)


# -- floors: the least a middleware could do, for the in-process benchmarks to compare with ----

_FLOOR_TASKS: set[asyncio.Task[None]] = set()


def start_task(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run ``coroutine`` as a bare asyncio task (``create_task`` runs it in a copy of the
    current context, as after-response runs each task), held until it is done."""
    task = asyncio.get_running_loop().create_task(coroutine)
    _FLOOR_TASKS.add(task)
    task.add_done_callback(_FLOOR_TASKS.discard)


class SendWatcher:
    """A pure ASGI middleware that only watches for the final body: the floor for "no task".

    Given ``side_effect``, the floor for "one task": once the final body has been sent, the
    request's call starts ``side_effect()`` as a bare task (as after-response starts one).
    """

    def __init__(
        self, app: ASGIApp, side_effect: Callable[[], Coroutine[Any, Any, None]] | None = None
    ) -> None:
        self.app = app
        self.side_effect = side_effect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        side_effect = self.side_effect
        complete = False

        async def send_watching(message: Message) -> None:
            nonlocal complete
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
                if side_effect is not None:
                    start_task(side_effect())

        await self.app(scope, receive, send_watching)
