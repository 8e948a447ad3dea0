"""Load through real servers and wrk, on 127.0.0.1: three server stacks, one after the other.

    python benchmarks/load.py [--duration 10] [--connections 32] [--rounds 3]
        [--stacks uvicorn-h11 uvicorn-uvloop granian] [--max-concurrency N] [--max-pending N]
        [--smoke]

A login endpoint with four 50 ms side effects (see ``load_app.py``), served in turn with no
side effects, with them awaited, with Starlette ``BackgroundTasks``, with asgi-background
and with after-response, under each server stack: uvicorn with h11 on the asyncio loop,
uvicorn with httptools on uvloop (``uvicorn[standard]``, what most deployments run) and
granian. For each: requests/s and latency (wrk), the app process's peak RSS (``VmHWM``),
the time from a response being sent to its request's last side effect being done, and the
side effects completed against those requested once the backlog has drained. The server is
pinned to one CPU and wrk to another when there are two. Writes ``benchmarks/results.json``
(for ``plot.py``, which draws the first stack).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import _support

HERE = _support.BENCHMARKS_DIR
LABELS = {
    "none": "no side effects",
    "awaited": "awaited in the handler",
    "starlette": "Starlette BackgroundTasks",
    "asgi-background": "asgi-background",
    "after-response": "after-response",
    "after-response-idle": "after-response installed, no side effects",
}
DEFAULT_VARIANTS = tuple(LABELS)
#: A smoke run keeps what the targets compare (it checks the scripts, not the numbers).
SMOKE_VARIANTS = ("starlette", "asgi-background", "after-response")
STACKS = {
    "uvicorn-h11": "uvicorn, h11 on the asyncio loop",
    "uvicorn-uvloop": "uvicorn[standard], httptools on uvloop",
    "granian": "granian, ASGI, 1 worker, its default loop",
}


def run_wrk(args: argparse.Namespace, url: str, seconds: float, cpu: int | None) -> dict[str, Any]:
    script = HERE / "wrk_login.lua"
    return _support.run_wrk(url, seconds, script, args.connections, args.threads, cpu)


def start_server(
    args: argparse.Namespace, stack: str, variant: str, cpu: int | None
) -> tuple[subprocess.Popen[bytes], str, socket.socket | None]:
    """Start ``load_app.py``; returns the process, its base URL and the socket it serves."""
    command = [
        sys.executable,
        str(HERE / "load_app.py"),
        variant,
        "--stack",
        stack,
        "--max-concurrency",
        str(args.max_concurrency),
        "--max-pending",
        str(args.max_pending),
    ]
    if stack == "granian":
        # Granian binds the address itself: borrow a free port.
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        server = subprocess.Popen(_support.pinned([*command, "--port", str(port)], cpu))
        return server, f"http://127.0.0.1:{port}", None
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    listener.set_inheritable(True)
    server = subprocess.Popen(
        _support.pinned([*command, "--fd", str(listener.fileno())], cpu),
        pass_fds=(listener.fileno(),),
    )
    return server, f"http://127.0.0.1:{listener.getsockname()[1]}", listener


def wait_until_ready(base_url: str, server: subprocess.Popen[bytes]) -> str:
    """The event loop the app runs on, once it answers (bounded: 60 s)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            # Uvicorn's socket already listens: this waits in its backlog until it serves.
            with urllib.request.urlopen(base_url + "/bench/ready", timeout=60) as response:
                return str(json.loads(response.read())["loop"])
        except (ConnectionError, urllib.error.URLError):
            # Granian's port refuses connections until granian has bound it.
            if server.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def measure_variant(
    args: argparse.Namespace,
    stack: str,
    variant: str,
    server_cpu: int | None,
    client_cpu: int | None,
) -> dict[str, Any]:
    server, base_url, listener = start_server(args, stack, variant, server_cpu)
    try:
        loop = wait_until_ready(base_url, server)
        if args.warmup > 0:
            run_wrk(args, base_url + "/login", args.warmup, client_cpu)
            _support.post(base_url, "/bench/drain?timeout=60", timeout=90)
            _support.post(base_url, "/bench/reset", timeout=10)
        wrk = run_wrk(args, base_url + "/login", args.duration, client_cpu)
        drained = _support.post(base_url, f"/bench/drain?timeout={args.drain_timeout}", timeout=120)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if listener is not None:
            listener.close()
    delays_ms = [delay * 1000 for delay in drained["delays"]]
    after = [delay for delay in delays_ms if delay >= 0]
    seconds = wrk["duration_us"] / 1e6
    return {
        "stack": stack,
        "loop": loop,
        "variant": variant,
        "label": LABELS[variant],
        "requests_per_s": wrk["requests"] / seconds,
        "latency_ms": {key: value / 1000 for key, value in wrk["latency_us"].items()},
        "errors": sum(wrk["errors"].values()) + wrk["non_2xx"],
        "peak_rss_mib": drained["peak_rss_mib"],
        # Only side effects that ran after the response: awaited ones finish before it.
        "effect_delay_ms": {
            "p50": _support.percentile(after, 50),
            "p99": _support.percentile(after, 99),
        }
        if after
        else None,
        "logins": drained["logins"],
        "requested": drained["requested"],
        "completed": drained["completed"],
        "lost": drained["lost"],
        "settled": drained["settled"],
        "stats": drained.get("stats"),
        "stats_at_end_of_load": drained.get("stats_at_end_of_load"),
    }


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians across rounds (the first round's non-numeric fields)."""
    first = rounds[0]
    if len(rounds) == 1:
        return first
    summary = dict(first)
    summary["requests_per_s"] = _support.median(r["requests_per_s"] for r in rounds)
    summary["peak_rss_mib"] = _support.median(r["peak_rss_mib"] for r in rounds)
    summary["latency_ms"] = {
        key: _support.median(r["latency_ms"][key] for r in rounds) for key in first["latency_ms"]
    }
    if first["effect_delay_ms"] is not None:
        summary["effect_delay_ms"] = {
            key: _support.median(r["effect_delay_ms"][key] for r in rounds)
            for key in first["effect_delay_ms"]
        }
    for key in ("logins", "requested", "completed", "lost", "errors"):
        summary[key] = sum(r[key] for r in rounds)
    summary["settled"] = all(r["settled"] for r in rounds)
    return summary


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def print_stack(
    stack: str, results: dict[str, dict[str, Any]], args: argparse.Namespace
) -> list[Any]:
    """The stack's table and targets; returns its row of the summary across stacks."""
    rows = []
    for result in results.values():
        delay = result["effect_delay_ms"]
        before = "before response" if result["requested"] else "-"
        rows.append(
            (
                result["label"],
                result["requests_per_s"],
                result["latency_ms"]["p50"],
                result["latency_ms"]["p99"],
                result["peak_rss_mib"],
                delay["p50"] if delay else before,
                delay["p99"] if delay else before,
                f"{result['completed']:,} / {result['requested']:,}",
                result["errors"],
            )
        )
    loop = next(iter(results.values()))["loop"]
    _support.print_table(
        f"{STACKS[stack]} (loop seen by the app: {loop}): login with four 50 ms side effects",
        (
            "variant",
            "req/s",
            "p50 ms",
            "p99 ms",
            "peak RSS MiB",
            "response→last effect p50 ms",
            "p99 ms",
            "effects done / requested",
            "errors",
        ),
        rows,
    )
    all_done = all(r["completed"] == r["requested"] and r["settled"] for r in results.values())
    judge = not args.smoke
    targets: list[tuple[str, str, bool | None]] = []
    summary: list[Any] = [stack, "n/a", "n/a", "n/a"]
    ours, theirs = results.get("after-response"), results.get("starlette")
    if ours and theirs:
        throughput = ratio(ours["requests_per_s"], theirs["requests_per_s"])
        p99 = ratio(ours["latency_ms"]["p99"], theirs["latency_ms"]["p99"])
        holds = "n/a" if not judge else "holds" if throughput >= 1.1 and p99 <= 0.5 else "MISSED"
        summary = [stack, f"{throughput:.2f}x", f"{p99:.2f}x", holds]
        targets += [
            (
                "after-response req/s ≥ 1.1x Starlette BackgroundTasks req/s",
                f"{throughput:.2f}x",
                throughput >= 1.1 if judge else None,
            ),
            (
                "after-response p99 latency ≤ 0.5x Starlette BackgroundTasks p99",
                f"{p99:.2f}x",
                p99 <= 0.5 if judge else None,
            ),
        ]
        if ours["effect_delay_ms"] and theirs["effect_delay_ms"]:
            for key in ("p50", "p99"):
                delay = ratio(ours["effect_delay_ms"][key], theirs["effect_delay_ms"][key])
                targets.append(
                    (
                        f"after-response response→last effect {key} ≤ 0.3x Starlette's",
                        f"{delay:.2f}x",
                        delay <= 0.3 if judge else None,
                    )
                )
    if ours and ours.get("stats_at_end_of_load"):
        at_end = ours["stats_at_end_of_load"]
        print(
            f"after-response when the load stopped (first round): {at_end['running']:,} running "
            f"(max_concurrency={args.max_concurrency:,}), {at_end['pending']:,} pending "
            f"(max_pending={args.max_pending:,}).\n"
        )
    idle, none = results.get("after-response-idle"), results.get("none")
    if idle and none:
        cost = ratio(none["requests_per_s"], idle["requests_per_s"])
        targets.append(
            (
                "time per request with after-response installed and no task ≤ 1.05x without",
                f"{cost:.3f}x",
                cost <= 1.05 if judge else None,
            )
        )
    targets.append(
        (
            "every side effect completed once the backlog drained (none lost)",
            ", ".join(f"{r['completed']:,}/{r['requested']:,}" for r in results.values()),
            all_done,
        )
    )
    _support.print_targets(targets)
    return [*summary, "holds" if all_done else "MISSED"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds of load per variant")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of unmeasured load")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians across them)")
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=3000,
        help="after-response's max_concurrency: sized for the offered load (4 x 50 ms side "
        "effects at up to ~8,000 logins/s here need ~1,600 at once; with 1,000 the bound "
        "fills, the queue with it, and throughput falls below BackgroundTasks')",
    )
    parser.add_argument(
        "--max-pending", type=int, default=10_000, help="after-response's max_pending"
    )
    parser.add_argument("--drain-timeout", type=float, default=60)
    parser.add_argument("--variants", nargs="+", choices=sorted(LABELS))
    parser.add_argument("--stacks", nargs="+", choices=list(STACKS), default=list(STACKS))
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and wrk to CPUs")
    parser.add_argument("--json", type=Path, default=HERE / "results.json", help="results file")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, numbers meaningless")
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.warmup, args.connections, args.rounds = 1, 0, 4, 1
    args.variants = args.variants or (SMOKE_VARIANTS if args.smoke else DEFAULT_VARIANTS)
    if shutil.which("wrk") is None:
        print("load.py needs wrk on PATH (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2

    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = (
        (cpus[0], cpus[1]) if len(cpus) >= 2 and not args.no_pin else (None,) * 2
    )

    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        stack: {variant: [] for variant in args.variants} for stack in args.stacks
    }
    for _ in range(args.rounds):
        for stack in args.stacks:
            for variant in args.variants:
                result = measure_variant(args, stack, variant, server_cpu, client_cpu)
                raw[stack][variant].append(result)
    results = {
        stack: {variant: summarise(rounds) for variant, rounds in variants.items()}
        for stack, variants in raw.items()
    }

    info = _support.machine()
    _support.print_machine()
    pinning = (
        f"server pinned to CPU {server_cpu}, wrk to CPU {client_cpu}"
        if server_cpu is not None
        else "not pinned"
    )
    print(
        f"One server process per variant (1 worker) and wrk ({args.threads} thread, "
        f"{args.connections} connections, {args.duration:g} s after {args.warmup:g} s of "
        f"warm-up, {args.rounds} round(s), stacks and variants interleaved); {pinning}; "
        f"after-response with max_concurrency={args.max_concurrency}.\n"
    )
    summary = [print_stack(stack, results[stack], args) for stack in args.stacks]
    _support.print_table(
        "Load targets by server stack (after-response against Starlette BackgroundTasks)",
        ("stack", "req/s (≥ 1.1x)", "p99 (≤ 0.5x)", "both", "no side effect lost"),
        summary,
    )
    first = results[args.stacks[0]]
    args.json.write_text(
        json.dumps(
            {
                "machine": info,
                "config": {
                    "duration_s": args.duration,
                    "warmup_s": args.warmup,
                    "connections": args.connections,
                    "wrk_threads": args.threads,
                    "rounds": args.rounds,
                    "max_concurrency": args.max_concurrency,
                    "max_pending": args.max_pending,
                    "effects_per_login": 4,
                    "effect_ms": 50,
                    "smoke": args.smoke,
                    "stack": args.stacks[0],
                },
                # The first stack, for plot.py; every stack under "stacks".
                "variants": list(first.values()),
                "stacks": {
                    stack: list(by_variant.values()) for stack, by_variant in results.items()
                },
                "rounds": raw,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"Wrote {args.json}")
    all_done = all(row[-1] == "holds" for row in summary)
    return 0 if all_done or args.smoke else 1


if __name__ == "__main__":
    _support.main_guard(main)
