"""What the store tests run in a process of their own: ``python -m tests.store_child MODE PATH``.

- ``crash``: save tasks in every state, flush, print READY, then kill itself with SIGKILL.
- ``claim OWNER``: print READY, wait for a line on stdin, claim 5 (and mark them done), print
  CLAIMED, wait for a line on stdin again, then claim 5 at a time until nothing is left;
  print the ids claimed as JSON.
- ``full``: with a file-size limit (RLIMIT_FSIZE), save a small batch, then one too big for
  the limit; print what happened as JSON.
- ``open-race PROCESSES TRIALS``: TRIALS times, fork PROCESSES processes that open (and close)
  one new store file at the same moment, as a server's workers do when they start; print how
  many opened and the errors of those that did not, as JSON. PATH is a directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys

from after_response._sqlite import SQLiteStore
from after_response._store import StoredTask, StoreError


def task(id: str, **fields: object) -> StoredTask:
    return StoredTask(id=id, name="send", target="tests.durable_tasks:record", **fields)  # type: ignore[arg-type]


async def crash(path: str) -> None:
    store = SQLiteStore(path)
    await store.open("child")
    ids = ["running-1", "running-2", "queued", "retry", "done-keyed", "done", "dead"]
    keys = {"done-keyed": "receipt-1"}
    await store.save([task(i, owner="child", key=keys.get(i)) for i in ids])
    store.mark_running("running-1", 1)
    store.mark_running("running-2", 1)
    store.mark_retry("retry", 1, 0.0, "ConnectionError", "refused")
    store.mark_succeeded("done-keyed")
    store.mark_succeeded("done")
    store.mark_dead("dead", 3, "ValueError", "bad")
    await store.flush()
    print("READY", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


async def claim(path: str, owner: str) -> None:
    store = SQLiteStore(path, busy_timeout=10.0)
    await store.open(owner)
    print("READY", flush=True)
    sys.stdin.readline()  # wait for GO, so that the processes claim at the same time
    claimed: list[str] = []
    while batch := await store.claim(owner, 5):
        claimed += [t.id for t in batch]
        for claimed_task in batch:
            store.mark_succeeded(claimed_task.id)
        if len(claimed) == len(batch):
            # Each process claims once before any goes on: a busy machine could otherwise
            # schedule one through the whole queue before the others wake.
            print("CLAIMED", flush=True)
            sys.stdin.readline()
    await store.close()
    print(json.dumps(claimed))


async def full(path: str) -> None:
    store = SQLiteStore(path)
    await store.open("child")
    await store.save([task("small-1"), task("small-2")])
    # The WAL grows past the limit on this save: the write fails with EFBIG, not a signal.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = sum(os.stat(name).st_size for name in (path, path + "-wal")) + 64 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    big = [task(f"big-{n}", args=["secret-argument-value", "x" * 4096]) for n in range(64)]
    result: dict[str, object] = {}
    try:
        await store.save(big)
    except StoreError as exc:
        result["error"] = str(exc)
    result["big_stored"] = sum(store.get(t.id) is not None for t in big)
    result["small_stored"] = sum(store.get(i) is not None for i in ("small-1", "small-2"))
    print(json.dumps(result), flush=True)
    os._exit(0)  # closing would write again, past the limit


async def open_and_close(path: str, owner: str) -> None:
    store = SQLiteStore(path)
    await store.open(owner)
    await store.close()


def open_race(directory: str, processes: int, trials: int) -> None:
    opened, errors = 0, []
    for trial in range(trials):
        path = os.path.join(directory, f"race-{trial}.sqlite3")
        start, go = os.pipe()
        results, report = os.pipe()
        pids = []
        for n in range(processes):
            pid = os.fork()
            if pid == 0:
                os.close(go)
                os.read(start, 1)  # end of file once the parent closes its end: all at once
                try:
                    asyncio.run(open_and_close(path, f"worker-{n}"))
                    os.write(report, b"ok\n")
                except StoreError as exc:
                    os.write(report, f"{exc}\n".encode())
                os._exit(0)
            pids.append(pid)
        os.close(start)
        os.close(go)  # go
        for pid in pids:
            os.waitpid(pid, 0)
        os.close(report)
        with os.fdopen(results) as lines:
            for line in lines:
                if line.strip() == "ok":
                    opened += 1
                else:
                    errors.append(line.strip())
    print(json.dumps({"opened": opened, "errors": errors}), flush=True)


if __name__ == "__main__":
    mode, path, *rest = sys.argv[1:]
    if mode == "claim":
        asyncio.run(claim(path, *rest))
    elif mode == "open-race":
        open_race(path, *map(int, rest))
    else:
        asyncio.run(crash(path) if mode == "crash" else full(path))
