"""The README stays true and short: its two commands, and a page, not a manual.

Its snippets, links and the files it names are checked with the docs' in ``test_docs.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

DEMO_COMMAND = "./demo.sh"
TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/pytest"

#: Fenced code blocks: (language, body).
FENCE = re.compile(r"^```(?P<language>[\w-]*)\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)


def code_blocks(language: str | None = None) -> list[str]:
    return [
        match["body"]
        for match in FENCE.finditer(README)
        if language is None or match["language"] == language
    ]


def test_first_code_block_holds_exactly_the_demo_and_the_test_command() -> None:
    first = code_blocks()[0]
    commands = [line.split("  #", 1)[0].strip() for line in first.splitlines() if line.strip()]
    assert commands == [DEMO_COMMAND, TEST_COMMAND]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert TEST_COMMAND in [line.strip() for line in ci_lines]


def test_readme_fits_on_a_page() -> None:
    assert len(README) <= 10_000, (
        f"README.md has {len(README):,} characters; move reference material to docs/"
    )
