"""Run every benchmark and write ``benchmarks/RESULTS.md`` (and ``results.json``/``.png``).

    python benchmarks/run_all.py [--smoke] [--output-dir benchmarks]

Runs overhead.py, profile_hot_path.py, load.py, executor.py, overload.py, fairness.py,
durable.py, engines.py and plot.py one after the other (each prints its table as it finishes) and
collects their tables, with the machine and the date, into RESULTS.md. Exits non-zero if a
benchmark failed (not if a target was missed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import _support

HERE = _support.BENCHMARKS_DIR


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every benchmark in smoke mode")
    parser.add_argument("--output-dir", type=Path, default=HERE)
    args = parser.parse_args()
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    smoke = ["--smoke"] if args.smoke else []
    results_json, results_png = out / "results.json", out / "results.png"
    steps = [
        ("Per-request overhead", "overhead.py", smoke),
        ("Hot-path profile: one request, one task", "profile_hot_path.py", smoke),
        (
            "Load through three server stacks and wrk",
            "load.py",
            [*smoke, "--json", str(results_json)],
        ),
        ("Executor throughput and scheduling delay", "executor.py", smoke),
        ("Sustained overload", "overload.py", smoke),
        ("Fairness: /health under a flood of side effects", "fairness.py", smoke),
        ("What durability costs", "durable.py", smoke),
        ("Handing off to an engine", "engines.py", smoke),
        (
            "Plot",
            "plot.py",
            ["--input", str(results_json), "--output", str(results_png)],
        ),
    ]
    info = _support.machine()
    sections: list[str] = []
    failed: list[str] = []
    for title, script, options in steps:
        command = [sys.executable, str(HERE / script), *options]
        print(f"== {script} {' '.join(options)}", flush=True)
        started = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        print(completed.stdout, flush=True)
        if completed.returncode != 0:
            failed.append(script)
            print(completed.stderr, file=sys.stderr, flush=True)
        if script == "plot.py":
            continue
        body = _without_machine_line(completed.stdout)
        status = "" if completed.returncode == 0 else f" (exit status {completed.returncode})"
        sections.append(
            f"## {title}{status}\n\n`python benchmarks/{script}` ({elapsed:.0f} s)\n\n{body}"
        )

    lines = [
        "# Benchmark results",
        "",
        f"- Machine: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable), "
        f"{info['system']}",
        f"- Python {info['python']}",
        f"- Date: {info['date']}",
        "- Command: `python benchmarks/run_all.py`"
        + (" --smoke (numbers meaningless)" * bool(smoke)),
        "",
        "Timing ratios are measured side by side in one run; absolute numbers depend on the "
        "machine (and on what else it runs).",
        "",
        f"![throughput and latency per variant]({results_png.name})",
        "",
        *sections,
    ]
    (out / "RESULTS.md").write_text("\n".join(lines).rstrip() + "\n")
    print(f"Wrote {out / 'RESULTS.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _without_machine_line(output: str) -> str:
    kept = [line for line in output.splitlines() if not line.startswith("Machine: ")]
    return "\n".join(kept).strip() + "\n"


if __name__ == "__main__":
    _support.main_guard(main)
