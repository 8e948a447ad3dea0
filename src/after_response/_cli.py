"""The command line: ``after-response dead-letters list|show|retry|purge --db PATH``.

Also ``python -m after_response ...``. Exit codes: 0 done, 1 nothing matched or an error,
2 a usage mistake. Task arguments are never printed, only their count and keyword names.
``list`` and ``show`` open the file read-only; no command writes to a file that is not an
after-response store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any, Final

from ._redact import safe_message
from ._replay import replay, resolve
from ._sqlite import SQLiteStore
from ._store import DEAD, StoredTask, StoreError

ENVIRONMENT_VARIABLE: Final = "AFTER_RESPONSE_DB"
_MESSAGE_WIDTH: Final = 60
_EVERYTHING: Final = 1_000_000_000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="after-response", description="Inspect and handle after-response's durable store."
    )
    commands = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    group = commands.add_parser("dead-letters", help="durable tasks whose last attempt failed")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db", metavar="PATH", help=f"the store file (default: ${ENVIRONMENT_VARIABLE})"
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON for scripts")
    listing = actions.add_parser("list", parents=[common, as_json], help="list dead letters")
    listing.add_argument("--limit", type=int, default=1000, help="at most this many (1000)")
    show = actions.add_parser("show", parents=[common, as_json], help="show one task")
    show.add_argument("id")
    for name, what in (
        ("retry", "make dead letters ready again (or run them now with --run)"),
        ("purge", "delete dead letters"),
    ):
        action = actions.add_parser(name, parents=[common], help=what)
        action.add_argument("id", nargs="?", help="the dead letter's id")
        action.add_argument("--all", action="store_true", help="every dead letter")
        if name == "retry":
            action.add_argument("--run", action="store_true", help="run them in this process")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code.

    The working directory is put first on ``sys.path`` (as ``python -m`` does), so that
    ``retry --run`` imports the app's modules when run from the app's directory.
    """
    _working_directory_first()
    parser = _parser()
    options = parser.parse_args(argv)
    options.db = options.db or os.environ.get(ENVIRONMENT_VARIABLE)
    if not options.db:
        parser.error(f"give the store file with --db PATH or ${ENVIRONMENT_VARIABLE}")
    if options.action in ("retry", "purge") and (options.id is None) == (not options.all):
        parser.error(f"{options.action} needs either an ID or --all (not both)")
    if not os.path.isfile(options.db):
        return _fail(
            f"no store at {options.db} (the file does not exist); "
            "give the path your application's SQLiteStore uses"
        )
    try:
        return asyncio.run(_run(options))
    except StoreError as exc:
        return _fail(str(exc))


def _working_directory_first() -> None:
    # The console script's sys.path starts with its own directory (the virtualenv's bin),
    # where ``python -m`` puts the working directory; celery's command line adds it alike.
    try:
        working_directory = os.getcwd()
    except FileNotFoundError:  # it was deleted: there is nothing to import from
        return
    if working_directory not in sys.path:
        sys.path.insert(0, working_directory)


def _fail(message: str) -> int:
    print(f"after-response: {message}", file=sys.stderr)
    return 1


async def _run(options: argparse.Namespace) -> int:
    store = SQLiteStore(options.db)
    store.open_read_only()  # first: a file that is not a store is refused, never written
    try:
        if options.action == "list":
            return _list(store, options.db, options.limit, options.json)
        if options.action == "show":
            return _show(store.get(options.id), options)
    finally:
        await store.close()
    return await _write(store, options)


async def _write(store: SQLiteStore, options: argparse.Namespace) -> int:
    owner = f"cli:{socket.gethostname()}:{os.getpid()}"
    await store.open(owner)
    try:
        ids = [] if options.all else [options.id]
        if options.action == "purge":
            count = await store.purge_dead(ids, all_dead=options.all)
            return _counted(count, "purged", options)
        if options.run:
            return await _run_now(store, owner, options)
        count = await store.retry_dead(ids, all_dead=options.all)
        return _counted(count, "queued again for a live process of the app", options)
    finally:
        await store.close()


def _counted(count: int, done: str, options: argparse.Namespace) -> int:
    if not count:
        which = "no dead letters" if options.all else f"no dead letter with id {options.id}"
        return _fail(f"{which} in {options.db}")
    print(f"{count} dead letter{'s' if count > 1 else ''} {done}")
    return 0


async def _run_now(store: SQLiteStore, owner: str, options: argparse.Namespace) -> int:
    if options.id:
        task = store.get(options.id)
        dead = [task] if task is not None and task.state == DEAD else []
    else:
        dead = store.dead_letters(_EVERYTHING)
    functions = _importable(dead)
    # Owned by this process while they run: a live app does not take them meanwhile.
    claimed = await store.retry_dead(list(functions), owner=owner) if functions else 0
    if not claimed and len(functions) == len(dead):
        return _counted(0, "", options)
    taken = [t for t in map(store.get, functions) if t is not None and t.owner == owner]
    failed = len(dead) - len(functions)
    for task in taken:
        outcome = await replay(store, task, functions[task.id])
        failed += not outcome.succeeded
        result = "succeeded" if outcome.succeeded else f"dead again ({outcome.error_type})"
        print(f"{task.id}  {task.name}  {result} after {outcome.attempts} attempt(s)")
    await store.flush()
    return 1 if failed else 0


def _importable(dead: list[StoredTask]) -> dict[str, Callable[..., Any]]:
    """The function of each dead letter, by id; those whose function does not import here
    are named on stderr and left in the store as they are (their error is not replaced)."""
    functions: dict[str, Callable[..., Any]] = {}
    for task in dead:
        try:
            functions[task.id] = resolve(task.target)
        except Exception as exc:
            print(
                f"after-response: not run: {task.id} ({task.name}): {task.target} cannot be "
                f"imported here ({type(exc).__name__}: {safe_message(exc)}); "
                f"{_import_fix(exc)}; the dead letter is left as it was",
                file=sys.stderr,
            )
    return functions


def _import_fix(exc: Exception) -> str:
    if isinstance(exc, ImportError):
        return (
            "run the command from your app's directory (in its virtualenv), or set "
            "PYTHONPATH so that its modules import"
        )
    if isinstance(exc, (AttributeError, TypeError)):  # the module has no such function
        return "was it renamed or removed? put it back, or purge the dead letter"
    return "its module raised while being imported: fix it, or run where it imports"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _one_line(message: str | None, width: int) -> str:
    text = " ".join((message or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _record(task: StoredTask) -> dict[str, Any]:
    """The task's fields for output: the arguments only as a count and keyword names."""
    fields = {k: v for k, v in vars(task).items() if k not in ("args", "kwargs")}
    fields["arguments"] = {"positional": len(task.args), "keyword_names": sorted(task.kwargs)}
    return fields


def _list(store: SQLiteStore, db: str, limit: int, as_json: bool) -> int:
    dead = store.dead_letters(limit)
    if as_json:
        print(json.dumps([_record(task) for task in dead], indent=2))
        return 0
    if not dead:
        print(f"no dead letters in {db}")
        return 0
    header = ("ID", "NAME", "ATTEMPTS", "ERROR", "MESSAGE", "DEAD AT")
    rows = [header]
    for t in dead:
        message = _one_line(t.error_message, _MESSAGE_WIDTH)
        rows.append(
            (t.id, t.name, str(t.attempt), t.error_type or "-", message, _when(t.finished_at))
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0


def _show(task: StoredTask | None, options: argparse.Namespace) -> int:
    if task is None:
        return _fail(f"no task with id {options.id} in {options.db}")
    if options.json:
        print(json.dumps(_record(task), indent=2))
        return 0
    names = ", ".join(sorted(task.kwargs)) or "none"
    lines = {
        "id": task.id,
        "name": task.name,
        "target": task.target,
        "state": task.state + (" (dead letter)" if task.state == DEAD else ""),
        "attempts": str(task.attempt),
        "error": f"{task.error_type}: {task.error_message}" if task.error_type else "-",
        "arguments": f"{len(task.args)} positional, keyword names: {names} (values not shown)",
        "key": task.key or "-",
        "request": f"{task.request_method} {task.request_path}".strip() or "-",
        "options": json.dumps(task.options),
        "traceparent": task.trace_context.get("traceparent", "-"),
        "owner": task.owner or "-",
        "recovered": "yes" if task.recovered else "no",
        "created": _when(task.created_at),
        "updated": _when(task.updated_at),
        "finished": _when(task.finished_at),
    }
    for label, value in lines.items():
        print(f"{label + ':':<12} {value}")
    return 0
