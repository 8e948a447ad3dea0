"""The README stays true: its two commands, its Python snippets and the files it names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")

DEMO_COMMAND = "./demo.sh"
TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/pytest"

#: Fenced code blocks: (language, body).
FENCE = re.compile(r"^```(?P<language>[\w-]*)\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)
#: Paths of example, benchmark and test files named anywhere in the README.
FILE_PATH = re.compile(r"\b(?:examples|benchmarks|tests)/[\w./-]*\w\.(?:py|md|png|json|lua)\b")


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


@pytest.mark.parametrize("snippet", code_blocks("python"))
def test_python_snippet_parses(snippet: str) -> None:
    ast.parse(snippet)


def test_readme_has_python_snippets() -> None:
    assert len(code_blocks("python")) >= 5


@pytest.mark.parametrize("path", sorted(set(FILE_PATH.findall(README))))
def test_named_file_exists(path: str) -> None:
    assert (ROOT / path).is_file(), f"README.md names {path}, which does not exist"
