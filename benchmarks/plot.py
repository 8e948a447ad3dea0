"""Plot the load benchmark: throughput, latency and response→last-effect time per variant.

    python benchmarks/plot.py [--input benchmarks/results.json] [--output benchmarks/results.png]

Reads the JSON file ``load.py`` writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import _support
import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # after choosing the backend

OURS = "after-response"


def plot(results: dict[str, Any], output: Path) -> None:
    variants = results["variants"]
    labels = [
        v["label"].replace(", ", ",\n").replace(" installed", "\ninstalled") for v in variants
    ]
    colors = ["tab:green" if v["variant"] == OURS else "tab:gray" for v in variants]
    positions = range(len(variants))

    figure, (throughput, latency, effects) = plt.subplots(1, 3, figsize=(17, 5.5))
    config, machine = results["config"], results["machine"]
    figure.suptitle(
        f"Login with {config['effects_per_login']} x {config['effect_ms']} ms side effects: "
        f"uvicorn + wrk, {config['connections']} connections, {config['duration_s']:g} s "
        f"({machine['cpu']}, {machine['cores']} cores, {machine['date']})"
    )

    values = [v["requests_per_s"] for v in variants]
    bars = throughput.barh(positions, values, color=colors)
    throughput.bar_label(bars, labels=[f"{value:,.0f}" for value in values], padding=3)
    throughput.set_title("Throughput (requests/s, higher is better)")
    _labels(throughput, labels)

    p50 = [v["latency_ms"]["p50"] for v in variants]
    p99 = [v["latency_ms"]["p99"] for v in variants]
    height = 0.4
    latency.barh([p - height / 2 for p in positions], p50, height, label="p50", color="tab:blue")
    latency.barh([p + height / 2 for p in positions], p99, height, label="p99", color="tab:orange")
    latency.set_xscale("log")
    latency.set_title("Response latency (ms, log scale, lower is better)")
    latency.legend()
    _labels(latency, [""] * len(labels))

    delays = [v["effect_delay_ms"] for v in variants]
    d50 = [d["p50"] if d else 0 for d in delays]
    d99 = [d["p99"] if d else 0 for d in delays]
    effects.barh([p - height / 2 for p in positions], d50, height, label="p50", color="tab:blue")
    effects.barh([p + height / 2 for p in positions], d99, height, label="p99", color="tab:orange")
    for position, variant, delay in zip(positions, variants, delays, strict=True):
        if delay is None:
            note = "done before the response" if variant["requested"] else "no side effects"
            effects.text(1, position, note, va="center", color="dimgray")
    effects.set_title("Response sent → last side effect done (ms)")
    effects.legend()
    _labels(effects, [""] * len(labels))

    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)


def _labels(axes: Any, labels: list[str]) -> None:
    axes.set_yticks(range(len(labels)), labels)
    axes.invert_yaxis()
    axes.grid(axis="x", alpha=0.3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = _support.BENCHMARKS_DIR
    parser.add_argument("--input", type=Path, default=here / "results.json")
    parser.add_argument("--output", type=Path, default=here / "results.png")
    parser.add_argument("--smoke", action="store_true", help="accepted for symmetry; same run")
    args = parser.parse_args()
    results = json.loads(args.input.read_text())
    plot(results, args.output)
    _support.print_table(
        f"Plotted {args.input.name} → {args.output.name}",
        ("variant", "req/s", "p50 ms", "p99 ms"),
        [
            (v["label"], v["requests_per_s"], v["latency_ms"]["p50"], v["latency_ms"]["p99"])
            for v in results["variants"]
        ],
    )
    return 0


if __name__ == "__main__":
    _support.main_guard(main)
