"""What durability costs: durable side effects against in-memory ones and Celery's ``.delay()``.

    python benchmarks/durable.py [--rounds 3] [--connections 64] [--smoke]

A checkout endpoint (``durable_app.py``) under uvicorn hands receipts to a side effect: in
memory, durable in a ``SQLiteStore`` (``synchronous`` FULL and NORMAL), or published with a
Celery task's ``.delay()`` to a Redis broker on 127.0.0.1 whose append-only file is fsynced
every second or at every write (``redis-server`` is started here; the Celery variants are
skipped, saying so, when it is not installed). With wrk: response latency with one client,
then throughput and latency with 64 connections. In one process (no sockets): durable tasks
stored, run and marked done per second. Then recovery: ``kill -9`` of a server under load,
a restart, and the time to the first recovered run. The server is pinned to one CPU, wrk
and Redis to another when there are two. Exits 1 if a side effect went missing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import _support
import durable_servers
import load
from durable_phases import (
    VARIANTS,
    measure_end_to_end,
    measure_http,
    measure_recovery,
)

SMOKE_VARIANTS = ("memory", "full", "celery")
SURVIVES = {
    "memory": "nothing",
    "full": "kill -9, power cut",
    "normal": "kill -9 (a power cut may lose the last commits)",
    "celery": "kill -9 (a power cut may lose the last second)",
    "celery-always": "kill -9, power cut",
    "celery-thread": "kill -9 (a power cut may lose the last second)",
}


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians across rounds; errors summed; accounting kept per round."""

    def medians(parts: list[dict[str, Any]]) -> dict[str, Any]:
        summary = {key: _support.median(p[key] for p in parts) for key in parts[0]}
        summary["errors"] = sum(p["errors"] for p in parts)
        return summary

    return {
        "one": medians([r["one"] for r in rounds]),
        "load": {n: medians([r["load"][n] for r in rounds]) for n in rounds[0]["load"]},
        "accounting": [r["accounting"] for r in rounds],
    }


def print_report(
    args: argparse.Namespace,
    http: dict[str, dict[str, Any]],
    e2e: dict[str, float],
    recovery: dict[str, Any] | None,
) -> bool:
    """Print the tables and the targets; whether every side effect was accounted for."""
    memory = http["memory"]
    _support.print_table(
        f"Response latency, one client (wrk -c1, {args.latency_duration:g} s, one side "
        "effect per request)",
        ("variant", "req/s", "p50 ms", "p99 ms", "p50 added over in memory, ms"),
        [
            (
                VARIANTS[k].label,
                r["one"]["requests_per_s"],
                r["one"]["p50"],
                r["one"]["p99"],
                _signed(r["one"]["p50"] - memory["one"]["p50"]),
            )
            for k, r in http.items()
        ],
    )
    rows = []
    for count in args.effects:
        base = memory["load"][count]
        for key, result in http.items():
            run = result["load"][count]
            rows.append(
                (
                    VARIANTS[key].label,
                    count,
                    run["requests_per_s"],
                    run["effects_per_s"],
                    run["p50"],
                    run["p99"],
                    f"{load.ratio(run['p99'], base['p99']):.2f}x",
                    run["errors"],
                )
            )
    _support.print_table(
        f"{args.connections} connections (wrk -c{args.connections}, {args.duration:g} s)",
        (
            "variant",
            "per request",
            "req/s",
            "side effects stored/s",
            "p50 ms",
            "p99 ms",
            "p99 vs in memory",
            "errors",
        ),
        rows,
    )
    _support.print_table(
        f"End to end in one process: {args.e2e_requests:,} requests adding "
        f"{args.e2e_tasks} no-op tasks each, until every task ran and was marked done",
        ("variant", "tasks/s", "vs in memory"),
        [
            (VARIANTS[k].label, rate, f"{load.ratio(rate, e2e['memory']):.2f}x")
            for k, rate in e2e.items()
        ],
    )
    most = max(args.effects)
    _support.print_table(
        "Side by side: what a request pays to hand a side effect over",
        (
            "variant",
            "latency added, p50 ms",
            f"hand-overs/s ({most} per request)",
            "once the response is sent, survives",
        ),
        [
            (
                VARIANTS[k].label,
                _signed(r["one"]["p50"] - memory["one"]["p50"]),
                r["load"][most]["effects_per_s"],
                SURVIVES[k],
            )
            for k, r in http.items()
        ],
    )
    if recovery is not None:
        _support.print_table(
            f"Recovery: kill -9 after {args.recovery_load:g} s of {args.connections} "
            f"connections (FULL, {args.recovery_effect_seconds:g} s side effects), restart at "
            f"once; owner_timeout={args.owner_timeout:g} s (the default is 30 s)",
            (
                "unfinished at the kill",
                "recovered",
                "left in the store",
                "restart → ready s",
                "restart → first recovered run s",
                "kill → first recovered run s",
            ),
            [tuple(recovery.values())],
        )

    accounted = {k: all(h == d for h, d in r["accounting"]) for k, r in http.items()}
    recovered_all = recovery is None or (
        recovery["recovered"] == recovery["unfinished"] and recovery["left"] == 0
    )
    _support.print_targets(targets(args, http, e2e, accounted, recovery, recovered_all))
    return all(accounted.values()) and recovered_all


def targets(
    args: argparse.Namespace,
    http: dict[str, dict[str, Any]],
    e2e: dict[str, float],
    accounted: dict[str, bool],
    recovery: dict[str, Any] | None,
    recovered_all: bool,
) -> list[tuple[str, str, bool | None]]:
    judge = not args.smoke
    memory = http["memory"]
    found: list[tuple[str, str, bool | None]] = []
    if "full" in http:
        added = http["full"]["one"]["p50"] - memory["one"]["p50"]
        found.append(
            (
                "durable (FULL) over in memory, response latency added, p50, one client ≤ 0.5 ms",
                f"{_signed(added)} ms",
                added <= 0.5 if judge else None,
            )
        )
    most = max(args.effects)
    for key in ("full", "normal"):
        if key not in http:
            continue
        name = key.upper()
        rate = http[key]["load"][most]["effects_per_s"]
        found.append(
            (
                f"{name}: durable side effects stored/s, {args.connections} connections, "
                f"{most} per request ≥ 10,000",
                f"{rate:,.0f}/s",
                rate >= 10_000 if judge else None,
            )
        )
        for count in args.effects:
            ratio = load.ratio(http[key]["load"][count]["p99"], memory["load"][count]["p99"])
            found.append(
                (
                    f"{name}: request p99 ≤ 2x in memory's, {args.connections} connections, "
                    f"{count} per request",
                    f"{ratio:.2f}x",
                    ratio <= 2 if judge else None,
                )
            )
    found.append(
        (
            "end to end in one process, FULL ≥ 3,000 durable tasks/s",
            f"{e2e['full']:,.0f}/s",
            e2e["full"] >= 3_000 if judge else None,
        )
    )
    found.append(
        (
            "every side effect ran (or was published) once the server drained",
            ", ".join(f"{k}: {_accounting(r['accounting'])}" for k, r in http.items()),
            all(accounted.values()),
        )
    )
    if recovery is not None:
        found.append(
            (
                "every task unfinished at the kill recovered, none left in the store",
                f"{recovery['recovered']:,}/{recovery['unfinished']:,}, {recovery['left']} left",
                recovered_all,
            )
        )
    return found


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _accounting(rounds: list[tuple[int, int]]) -> str:
    return " ".join(f"{done:,}/{handed:,}" for handed, done in rounds)


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (tmpfs makes FULL's fsync free)."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians across them)")
    parser.add_argument("--warmup", type=float, default=1, help="seconds before each wrk run")
    parser.add_argument("--latency-duration", type=float, default=5, help="one client, s")
    parser.add_argument("--duration", type=float, default=8, help="many connections, s")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--effects", type=int, nargs="+", default=[1, 10], help="per request")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--e2e-requests", type=int, default=400)
    parser.add_argument("--e2e-tasks", type=int, default=50, help="durable tasks per request")
    parser.add_argument("--no-recovery", dest="recovery", action="store_false")
    parser.add_argument("--recovery-load", type=float, default=3, help="seconds before kill")
    parser.add_argument("--recovery-effect-seconds", type=float, default=0.2)
    parser.add_argument("--owner-timeout", type=float, default=2.0)
    parser.add_argument("--drain-timeout", type=float, default=60)
    parser.add_argument("--dir", type=Path, default=None, help="where the databases go")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--smoke", action="store_true", help="about 10 s, numbers meaningless")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.warmup, args.latency_duration, args.duration = 1, 0, 1, 1
        args.connections, args.effects, args.e2e_requests = 8, [10], 20
        args.recovery_load, args.owner_timeout = 0.5, 0.5
        args.variants = [v for v in args.variants if v in SMOKE_VARIANTS]
    if "memory" not in args.variants:
        args.variants.insert(0, "memory")  # the baseline of every ratio
    if shutil.which("wrk") is None:
        print("durable.py needs wrk on PATH (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    skipped = durable_servers.celery_unavailable()
    if skipped:
        args.variants = [v for v in args.variants if not v.startswith("celery")]
    cpus = sorted(os.sched_getaffinity(0))
    pins = (cpus[0], cpus[1]) if len(cpus) >= 2 and not args.no_pin else (None, None)

    with tempfile.TemporaryDirectory(prefix="durable-bench-", dir=args.dir) as temporary:
        directory = Path(temporary)
        with contextlib.ExitStack() as stack:
            broker = None
            if any(v.startswith("celery") for v in args.variants):
                broker = stack.enter_context(durable_servers.RedisBroker(directory, pins[1]))
            raw: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
            for round_ in range(args.rounds):
                for key in args.variants:
                    db = directory / f"{key}-{round_}.sqlite3"
                    uses = broker if key.startswith("celery") else None
                    raw[key].append(measure_http(args, VARIANTS[key], db, uses, pins))
        e2e = measure_end_to_end(args, directory, pins[0])
        recovery = None
        if args.recovery:
            recovery = measure_recovery(args, directory / "recovery.sqlite3", pins)
        filesystem = _filesystem(directory)

    _support.print_machine()
    client = "wrk" + (" and Redis" if not skipped else "")
    pinning = (
        f"server on CPU {pins[0]}, {client} on CPU {pins[1]}"
        if pins[0] is not None
        else "not pinned"
    )
    print(
        f"uvicorn (1 worker, h11, asyncio), wrk (1 thread), {args.rounds} round(s), "
        f"medians; {pinning}; SQLite files on {filesystem}"
        + (f", {_redis_version()}" if not skipped else "")
        + ".\n"
    )
    if skipped:
        print(f"Celery side by side: skipped, {skipped}.\n")
    http = {key: summarise(rounds) for key, rounds in raw.items()}
    return 0 if print_report(args, http, e2e, recovery) else 1


def _redis_version() -> str:
    completed = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    version = completed.stdout.split("v=")[1].split()[0] if "v=" in completed.stdout else "?"
    return f"Redis {version}"


if __name__ == "__main__":
    _support.main_guard(main)
