"""Handing durable side effects to Celery and taskiq: publish lag, hand-off throughput, and
response latency against calling the engine yourself.

    python benchmarks/engines.py [--engines celery taskiq] [--tasks 20000] [--smoke]

Per engine, with a real ``redis-server`` (append-only file fsynced every second, started
here) and the engine's real worker (``celery -A engines_app worker --pool=solo``,
``taskiq worker engines_app:broker --workers 1``), the web app (``engines_app.py``) in this
process, driven by in-process requests (no sockets):

- publish lag: from a response's last message to the relay's publish of its task returning
  (the message is in Redis), one request at a time;
- hand-off throughput: ``--tasks`` durable adds (``--per-request`` per request,
  ``--clients`` at once) until every one is marked published;
- response latency: a handler that hands a side effect off (``add()``, through the outbox)
  against one that calls the engine's ``.delay()`` / ``await .kiq()`` itself, interleaved in
  the same run, with the store in ``synchronous`` FULL (the default; survives a power cut)
  and NORMAL (survives a crash, like Redis's fsync every second).

Then it waits for the worker to have run every task it was handed. This process is pinned to
one CPU, Redis and the worker to another when there are two. Exits 1 if a task went missing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import _support
import durable_servers
from engines_phases import expected_runs, session, wait_for_worker, worker

DIRECT = {"celery": ".delay()", "taskiq": "await .kiq()"}
THROUGHPUT_TARGET = 5_000


def run_engine(
    engine: str, args: argparse.Namespace, broker: Any, directory: Path, pins: tuple[Any, Any]
) -> dict[str, Any]:
    """Every measurement of one engine, with its worker running; then the worker's counts."""
    broker.reset("everysec")
    with worker(engine, broker.url, directory / f"{engine}-worker.log", pins[1]):
        result = {
            mode: asyncio.run(
                session(engine, directory / f"{engine}-{mode}.sqlite3", mode, args, mode == "FULL")
            )
            for mode in ("FULL", "NORMAL")
        }
        expected = expected_runs(args, len(result))
        ran = wait_for_worker(expected, timeout=max(60.0, sum(expected.values()) / 200))
    return {"sessions": result, "expected": expected, "ran": ran}


def print_report(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> bool:
    """The tables and the targets; whether every task was handed off and ran."""
    p = _support.percentile
    lags = {engine: r["sessions"]["FULL"]["lag"] for engine, r in results.items()}
    _support.print_table(
        "Publish lag: a response's last message → its task published (in Redis), "
        "one request at a time",
        ("engine", "requests", "p50 ms", "p99 ms", "max ms"),
        [(e, len(v), p(v, 50), p(v, 99), max(v)) for e, v in lags.items()],
    )
    throughput = {engine: r["sessions"]["FULL"]["throughput"] for engine, r in results.items()}
    rows: list[tuple[object, ...]] = []
    for engine, t in throughput.items():
        rates = (t["stored_per_s"], t["published_per_s"])
        rows.append((engine, t["tasks"], *rates, f"{t['in_publish']:.0%}", t["publish_us"]))
    _support.print_table(
        f"Hand-off throughput through the outbox (SQLite FULL): {args.per_request} durable "
        f"adds per request, {args.clients} clients at once, until all are marked published",
        ("engine", "tasks", "stored/s (responses)", "published/s", "in publish()", "µs/message"),
        rows,
    )
    rows = []
    ratios: dict[tuple[str, int, str], float] = {}
    for engine, r in results.items():
        for clients in args.latency_clients:
            direct: list[float] = []
            direct_seconds = 0.0
            for mode, session_result in r["sessions"].items():
                measured = session_result["latency"][clients]
                latency, seconds = measured["latency"], measured["seconds"]
                direct += latency["direct"]
                direct_seconds += seconds["direct"]
                handoff = latency["handoff"]
                # Against the direct calls of the same session: the same store, same moment.
                ratio = p(handoff, 50) / p(latency["direct"], 50)
                ratios[engine, clients, mode] = ratio
                rate = len(handoff) / seconds["handoff"]
                label = f"hand-off, SQLite {mode}"
                quantiles = (p(handoff, 50), p(handoff, 99))
                rows.append((engine, clients, label, rate, *quantiles, f"{ratio:.2f}x"))
            label = f"{DIRECT[engine]} in the handler"
            rate = len(direct) / direct_seconds
            rows.append((engine, clients, label, rate, p(direct, 50), p(direct, 99), "1.00x"))
    _support.print_table(
        f"Response latency: a handler handing a side effect off vs calling the engine itself "
        f"({args.rounds} interleaved rounds of {args.requests} requests, shared by the clients)",
        ("engine", "clients", "variant", "req/s", "p50 ms", "p99 ms", "p50 vs direct"),
        rows,
    )
    accounted = {}
    rows = []
    for engine, r in results.items():
        stats_ok = all(
            s["drained"] and s["stats"].handed_off == s["stats"].added
            for s in r["sessions"].values()
        )
        accounted[engine] = stats_ok and r["ran"] == r["expected"]
        for counter, expected in r["expected"].items():
            rows.append((engine, counter, expected, r["ran"][counter]))
    _support.print_table(
        "Ran in the worker (counted in Redis by each run)",
        ("engine", "phase", "handed off / sent", "ran"),
        rows,
    )
    judge = not args.smoke
    targets: list[tuple[str, str, bool | None]] = []
    for engine, t in throughput.items():
        rate = t["published_per_s"]
        targets.append(
            (
                f"{engine}: hand-off throughput through the outbox ≥ {THROUGHPUT_TARGET:,} tasks/s",
                f"{rate:,.0f}/s",
                rate >= THROUGHPUT_TARGET if judge else None,
            )
        )
    for (engine, clients, mode), ratio in ratios.items():
        targets.append(
            (
                f"{engine}: hand-off (SQLite {mode}) response p50 no slower than "
                f"{DIRECT[engine]} in the handler, {clients} client(s)",
                f"{ratio:.2f}x",
                ratio <= 1.0 if judge else None,
            )
        )
    for engine, ok in accounted.items():
        r = results[engine]
        ran = sum(r["ran"].values())
        targets.append(
            (
                f"{engine}: every task handed off (stats: handed_off == added) and run once "
                "in the worker",
                f"{ran:,}/{sum(r['expected'].values()):,} ran",
                ok,
            )
        )
    _support.print_targets(targets)
    return all(accounted.values())


def unavailable(engines: list[str]) -> str | None:
    """Why the benchmark cannot run here, or ``None``."""
    if shutil.which("redis-server") is None:
        return "redis-server is not on PATH (Debian/Ubuntu: apt-get install redis-server)"
    for module in ("redis", *engines):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[bench,celery,taskiq]')"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", choices=["celery", "taskiq"])
    parser.add_argument("--lag-requests", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=20_000, help="durable adds, throughput")
    parser.add_argument("--per-request", type=int, default=50, help="durable adds per request")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients, throughput")
    parser.add_argument("--latency-clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5, help="latency: interleaved rounds")
    parser.add_argument("--requests", type=int, default=200, help="latency: per round")
    parser.add_argument("--dir", type=Path, default=None, help="where the databases go")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, numbers meaningless")
    args = parser.parse_args()
    args.engines = args.engines or ["celery", "taskiq"]
    if args.smoke:
        args.lag_requests, args.tasks, args.per_request, args.clients = 20, 500, 50, 4
        args.latency_clients, args.rounds, args.requests = [1, 4], 1, 10
    missing = unavailable(args.engines)
    if missing:
        print(f"engines.py needs {missing}", file=sys.stderr)
        return 2
    info = _support.machine()  # before this process is pinned to one CPU
    cpus = sorted(os.sched_getaffinity(0))
    pins = (cpus[0], cpus[1]) if len(cpus) >= 2 and not args.no_pin else (None, None)

    with tempfile.TemporaryDirectory(prefix="engines-bench-", dir=args.dir) as temporary:
        directory = Path(temporary)
        with durable_servers.RedisBroker(directory, pins[1]) as broker:
            # engines_app reads the broker's URL when it is first imported (in session()).
            os.environ["ENGINES_BENCH_REDIS_URL"] = broker.url
            if pins[0] is not None:
                _support.pin_to_cpu(pins[0])
            results = {e: run_engine(e, args, broker, directory, pins) for e in args.engines}
        filesystem = filesystem_of(directory)

    _support.print_machine(info)
    pinning = (
        f"this process on CPU {pins[0]}, Redis and the worker on CPU {pins[1]}"
        if pins[0] is not None
        else "not pinned"
    )
    print(
        f"The web app in this process (in-process requests, no sockets); {pinning}; "
        f"Redis with appendfsync everysec; SQLite files on {filesystem}.\n"
    )
    return 0 if print_report(args, results) else 1


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (``durable.py``'s look-up)."""
    import durable

    return durable._filesystem(path)


if __name__ == "__main__":
    _support.main_guard(main)
