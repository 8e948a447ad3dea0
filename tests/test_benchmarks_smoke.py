"""Every benchmark runs, end to end, in its few-seconds ``--smoke`` mode and prints its table.

No timing assertions: the numbers of a smoke run mean nothing; this only keeps the scripts
working. The load benchmark needs ``wrk``: skipped without it on a developer's machine, never
in CI (``CI=true``), which installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(script: str, *options: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", *options],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert completed.returncode == 0, (
        f"{script} exited {completed.returncode}\n{completed.stdout}\n{completed.stderr}"
    )
    return completed.stdout


def needs_wrk() -> None:
    if shutil.which("wrk") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("wrk is not on PATH; CI must install it (apt-get install wrk)")
        pytest.skip("wrk is not on PATH (apt-get install wrk)")


def test_overhead_benchmark_prints_its_table_and_targets_against_floors() -> None:
    output = run_benchmark("overhead.py")
    assert "| variant" in output
    assert "after-response, no task" in output
    assert "Starlette BackgroundTasks, one task" in output
    assert "asgi-background, one task" in output
    assert "floor: bare create_task per request, run to completion" in output
    assert "floor: create_task plus one SDK span" in output
    targets = output[output.index("Targets:") :]
    for target in ("no task", "one task", "tracing on", "metrics on", "no lifespan"):
        assert f"- {target}" in targets


def test_hot_path_profile_prints_a_table_of_pieces_per_configuration() -> None:
    output = run_benchmark("profile_hot_path.py")
    for config in ("plain", "tracing", "metrics", "no-lifespan"):
        assert f"### One request, one task, {config}: exclusive time by piece" in output
    for piece in ("| add:", "| record:", "| admission:", "| spawn:", "| attempt:", "| accounting:"):
        assert piece in output
    assert "| telemetry:" in output
    assert "| OpenTelemetry: the API and SDK" in output


def test_executor_benchmark_prints_its_tables() -> None:
    output = run_benchmark("executor.py")
    assert "Executor throughput" in output
    assert "after-response: 1 task per request" in output
    assert "Scheduling delay" in output


def test_overload_benchmark_accounts_for_every_task() -> None:
    output = run_benchmark("overload.py")
    assert "| variant" in output
    assert "after-response accounting after the drain" in output
    assert "added == succeeded+failed+timed_out+discarded+shed+abandoned" in output


def test_fairness_benchmark_prints_latency_ratios_and_the_loop_profile() -> None:
    output = run_benchmark("fairness.py")
    assert "GET /health latency" in output
    for label in (
        "flood, 50 side effects per request",
        'flood, overflow="backpressure", /health exempt',
        "control floods, no side effects",
    ):
        assert label in output
    assert "flood /health p50 ≤ 3x idle p50" in output
    assert "Where the server's loop thread spent" in output
    assert "after_response: top functions by cumulative time" in output


def test_load_benchmark_writes_results_and_plot_draws_them(tmp_path: Path) -> None:
    needs_wrk()
    results = tmp_path / "results.json"
    output = run_benchmark("load.py", "--json", str(results))
    assert "| variant" in output
    for label in ("Starlette BackgroundTasks", "asgi-background", "after-response"):
        assert label in output
    # Each server stack ran on the event loop it names.
    assert "uvicorn, h11 on the asyncio loop (loop seen by the app: asyncio." in output
    assert "httptools on uvloop (loop seen by the app: uvloop.Loop)" in output
    assert "granian, ASGI" in output
    stacks = json.loads(results.read_text())["stacks"]
    assert sorted(stacks) == ["granian", "uvicorn-h11", "uvicorn-uvloop"]

    image = tmp_path / "results.png"
    output = run_benchmark("plot.py", "--input", str(results), "--output", str(image))
    assert "| variant" in output
    assert image.read_bytes().startswith(b"\x89PNG")


def test_load_benchmark_counts_shed_side_effects_as_lost_through_the_dead_letter_hook(
    tmp_path: Path,
) -> None:
    # Bounds far below the offered load: most side effects are shed, each reaches the app's
    # on_dead_letter hook (in its own thread), and the ledger settles on them at once.
    needs_wrk()
    results = tmp_path / "results.json"
    output = run_benchmark(
        "load.py",
        *("--stacks", "uvicorn-h11", "--variants", "after-response"),
        *("--max-concurrency", "1", "--max-pending", "1", "--drain-timeout", "30"),
        *("--json", str(results)),
    )
    assert "pending (max_pending=1)" in output
    [ours] = json.loads(results.read_text())["stacks"]["uvicorn-h11"]
    assert ours["settled"], ours
    assert ours["lost"] > 0
    assert ours["completed"] + ours["lost"] == ours["requested"]
    assert ours["lost"] == ours["stats"]["shed"]


def test_durable_benchmark_accounts_for_every_side_effect_and_recovers_after_kill() -> None:
    needs_wrk()
    output = run_benchmark("durable.py")
    for label in ("after-response, in memory", "after-response durable, FULL"):
        assert label in output
    assert "End to end in one process" in output
    assert "once the server drained: memory:" in output
    assert "**MISSED**" not in output  # a smoke run judges no timing target...
    assert output.count("— **holds**") == 2  # ...only the accounting and the recovery
    if shutil.which("redis-server") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(
                "redis-server is not on PATH; CI must install it (apt-get install redis-server)"
            )
        assert "Celery side by side: skipped, redis-server is not on PATH" in output
    else:
        assert "Celery .delay(), Redis fsync 1/s" in output


def test_engines_benchmark_hands_every_task_to_each_engine_and_its_worker_runs_it() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(
                "redis-server is not on PATH; CI must install it (apt-get install redis-server)"
            )
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
    output = run_benchmark("engines.py")
    for table in ("Publish lag", "Hand-off throughput through the outbox", "Response latency"):
        assert f"### {table}" in output
    for engine, direct in (("celery", ".delay() in the handler"), ("taskiq", "await .kiq()")):
        assert f"| {engine} " in output
        assert direct in output
        assert f"- {engine}: hand-off throughput through the outbox ≥ 5,000 tasks/s" in output
    assert "**MISSED**" not in output  # a smoke run judges no timing target...
    assert output.count("— **holds**") == 2  # ...only that each worker ran every task
