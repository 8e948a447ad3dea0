"""The README and the documentation site stay true: every Python snippet parses, the snippets
marked ``<!-- run: NAME -->`` run (the quickstarts serve a request and their side effect
happens; the logging setups print what the docs say), and every file they name exists.

Each Python snippet carries a marker on the line before its fence: ``<!-- run: NAME -->``
(run by the test named in ``RUNNERS``) or ``<!-- no-run -->`` (a fragment: it leaves out the
app around it, and is only parsed).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent
PAGES: Final = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

#: A fenced code block, with the HTML comment on the line before it, if any.
FENCE = re.compile(
    r"(?:^<!-- (?P<marker>[^>]*?) -->\n)?^```(?P<language>[\w-]*)\n(?P<body>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)
#: Paths of repository files named in prose or code.
FILE_PATH = re.compile(
    r"(?<![\w/.-])(?:examples|benchmarks|tests|docs)/[\w./-]*\w\.(?:py|md|png|json|lua)\b"
)
#: Relative Markdown links (the README's; mkdocs --strict checks the site's own).
LINK = re.compile(r"\]\((?!https?://|#)(?P<target>[^)#\s]+)(?:#[^)]*)?\)")


@dataclass(frozen=True)
class Snippet:
    page: str
    line: int
    language: str
    body: str
    marker: str | None

    @property
    def run(self) -> str | None:
        """The runner's name, for a snippet marked ``<!-- run: NAME -->``."""
        if self.marker is None or not self.marker.startswith("run: "):
            return None
        return self.marker.removeprefix("run: ").strip()

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def snippets_of(page: Path) -> list[Snippet]:
    text = page.read_text(encoding="utf-8")
    return [
        Snippet(
            page=str(page.relative_to(ROOT)),
            line=text.count("\n", 0, match.start("body")),
            language=match["language"],
            body=match["body"],
            marker=match["marker"],
        )
        for match in FENCE.finditer(text)
    ]


SNIPPETS: Final = [snippet for page in PAGES for snippet in snippets_of(page)]
PYTHON: Final = [snippet for snippet in SNIPPETS if snippet.language == "python"]


def labelled(name: str) -> list[Snippet]:
    return [snippet for snippet in SNIPPETS if snippet.run == name]


def only(name: str) -> Snippet:
    [snippet] = labelled(name)
    return snippet


# -- every snippet ---------------------------------------------------------------------------


@pytest.mark.parametrize("snippet", PYTHON, ids=str)
def test_python_snippet_parses(snippet: Snippet) -> None:
    ast.parse(snippet.body, filename=str(snippet))


@pytest.mark.parametrize("snippet", PYTHON, ids=str)
def test_python_snippet_says_whether_it_runs(snippet: Snippet) -> None:
    assert snippet.marker == "no-run" or snippet.run in RUNNERS, (
        f"{snippet}: put <!-- no-run --> (a fragment) or <!-- run: NAME --> (NAME one of "
        f"{sorted(RUNNERS)}) on the line before the fence, not {snippet.marker!r}"
    )


def test_every_runner_has_its_snippets() -> None:
    assert {snippet.run for snippet in SNIPPETS if snippet.run} == set(RUNNERS)


def test_the_readme_quickstarts_are_run() -> None:
    readme = {snippet.run for snippet in snippets_of(ROOT / "README.md") if snippet.run}
    assert readme == {"starlette", "fastapi"}


@pytest.mark.parametrize(
    "path",
    sorted({path for page in PAGES for path in FILE_PATH.findall(page.read_text("utf-8"))}),
)
def test_named_file_exists(path: str) -> None:
    assert (ROOT / path).is_file(), f"the README or the docs name {path}, which does not exist"


@pytest.mark.parametrize(
    "target", sorted(set(LINK.findall((ROOT / "README.md").read_text(encoding="utf-8"))))
)
def test_readme_link_resolves(target: str) -> None:
    assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


# -- the quickstarts, run as written ---------------------------------------------------------


@pytest.mark.parametrize("snippet", labelled("starlette") + labelled("fastapi"), ids=str)
def test_quickstart_sends_the_email_after_answering(
    snippet: Snippet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module_path = tmp_path / f"quickstart_{snippet.run}.py"
    module_path.write_text(snippet.body, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(module_path.stem, module_path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the request model through it
    try:
        spec.loader.exec_module(module)
        with TestClient(module.app) as client:  # runs lifespan: its shutdown drains
            response = client.post("/login", json={"email": "ada@example.com"})
            assert response.status_code == 200
            assert response.json() == {"message": "Code sent"}
    finally:
        del sys.modules[spec.name]
    assert capsys.readouterr().out == "emailed a code to ada@example.com\n"


# -- the logging setups ----------------------------------------------------------------------

#: Serves one login whose side effect fails, with logging configured as uvicorn configures
#: it: ``uvicorn.Config`` applies ``--log-config`` (argv[1], or uvicorn's default) when built.
FAILING_LOGIN = textwrap.dedent(
    """
    import sys

    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.responses import JSONResponse
    from starlette.testclient import TestClient

    from after_response import AfterResponseMiddleware

    uvicorn.Config("unused:app", **({"log_config": sys.argv[1]} if len(sys.argv) > 1 else {}))
    import app_setup  # the app module's own logging setup, if any

    async def send_verification_email(to):
        raise ConnectionError(f"the SMTP server refused {to}")

    async def login(request):
        request.state.after_response.add(send_verification_email, "ada@example.com")
        return JSONResponse({"message": "Code sent"})

    app = AfterResponseMiddleware(Starlette(routes=[Route("/login", login, methods=["POST"])]))
    with TestClient(app) as client:
        client.post("/login")
    """
)
FAILED: Final = (
    "after-response task send_verification_email of POST /login failed after 1 attempt(s)"
)
#: The line ends with the task's id.
FAILED_LINE: Final = re.compile(re.escape(FAILED) + r" \[task [0-9a-f]{12}-[0-9a-f]+\]$")


def logged_by_failing_login(
    tmp_path: Path, *, app_setup: str = "", log_config: tuple[str, str] | None = None
) -> list[str]:
    """Run the failing login in a fresh interpreter; its stderr lines."""
    (tmp_path / "failing_login.py").write_text(FAILING_LOGIN, encoding="utf-8")
    (tmp_path / "app_setup.py").write_text(app_setup, encoding="utf-8")
    (tmp_path / "log_format.py").write_text(only("logging-json-formatter").body, "utf-8")
    arguments = []
    if log_config is not None:
        name, content = log_config
        (tmp_path / name).write_text(content, encoding="utf-8")
        arguments.append(str(tmp_path / name))
    result = subprocess.run(
        [sys.executable, "failing_login.py", *arguments],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stderr.splitlines()


def test_without_logging_setup_uvicorn_leaves_bare_lines(tmp_path: Path) -> None:
    """The snag the logging page fixes: Python's last-resort handler, message only."""
    assert any(FAILED_LINE.fullmatch(line) for line in logged_by_failing_login(tmp_path))


def test_basic_config_gives_lines_a_level_and_a_logger_name(tmp_path: Path) -> None:
    lines = logged_by_failing_login(tmp_path, app_setup=only("logging-basic").body)
    assert any(
        FAILED_LINE.search(line) and f" ERROR after_response: {FAILED}" in line for line in lines
    ), lines


def test_uvicorn_yaml_log_config_includes_the_after_response_logger(tmp_path: Path) -> None:
    config = ("log-config.yaml", only("logging-yaml-config").body)
    lines = logged_by_failing_login(tmp_path, log_config=config)
    assert any(
        FAILED_LINE.search(line) and f" ERROR after_response: {FAILED}" in line for line in lines
    ), lines


def test_uvicorn_json_log_config_writes_after_responses_fields(tmp_path: Path) -> None:
    config = ("log-config.json", only("logging-json-config").body)
    lines = logged_by_failing_login(tmp_path, log_config=config)
    records = [json.loads(line) for line in lines if line.startswith("{")]
    [failed] = [record for record in records if FAILED_LINE.fullmatch(record["message"])]
    assert failed["level"] == "ERROR"
    assert failed["logger"] == "after_response"
    assert failed["task_name"] == "send_verification_email"
    assert failed["message"].endswith(f"[task {failed['task_id']}]")
    assert (failed["request_method"], failed["request_path"]) == ("POST", "/login")
    assert failed["error_type"] == "ConnectionError"
    assert "ConnectionError" in failed["traceback"]
    assert "ada@example.com" not in json.dumps(records)  # the task's argument stays out


@pytest.mark.parametrize("snippet", labelled("testing"), ids=str)
def test_testing_page_examples_pass_as_test_modules(tmp_path: Path, snippet: Snippet) -> None:
    """Each example on the testing page is a test module: pytest runs it (through the
    installed plugin, for the fixtures) and every test in it passes."""
    module = tmp_path / f"test_docs_example_{snippet.line}.py"
    module.write_text(snippet.body, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         str(module)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout
    assert "failed" not in result.stdout


RUNNERS: Final = {
    "testing": test_testing_page_examples_pass_as_test_modules,
    "starlette": test_quickstart_sends_the_email_after_answering,
    "fastapi": test_quickstart_sends_the_email_after_answering,
    "logging-basic": test_basic_config_gives_lines_a_level_and_a_logger_name,
    "logging-yaml-config": test_uvicorn_yaml_log_config_includes_the_after_response_logger,
    "logging-json-formatter": test_uvicorn_json_log_config_writes_after_responses_fields,
    "logging-json-config": test_uvicorn_json_log_config_writes_after_responses_fields,
}
