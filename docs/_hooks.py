"""mkdocs hook: publish the benchmark plot from benchmarks/, where the benchmarks write it,
instead of keeping a copy under docs/ that would go stale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
GENERATED = {"benchmarks/results.png": ROOT / "benchmarks" / "results.png"}


def on_files(files: Files, config: Any) -> Files:
    for uri, source in GENERATED.items():
        files.append(File.generated(config, uri, abs_src_path=str(source)))
    return files
