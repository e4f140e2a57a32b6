"""`celery worker` subprocesses of `tests/worker_app.py`, started and stopped by tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .conftest import stop_process

ROOT = Path(__file__).resolve().parent.parent


def celery_worker(
    server: Any, env: dict[str, str] | None = None, *options: str, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """A `celery worker` of `tests.worker_app` on the test server, in its own session.

    ``env`` sets the worker app's switches (``PERKEY_TEST_BACKEND``…); ``log`` collects
    its output, which is dropped otherwise.
    """
    full_env = dict(os.environ, PERKEY_TEST_PORT=str(server.port), **(env or {}))
    out: Any = subprocess.DEVNULL if log is None else log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.worker_app", "worker",
             "--loglevel=WARNING", "--without-gossip", "--without-mingle",
             "--without-heartbeat", *(options or ("--pool=solo",))],
            cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    finally:
        if log is not None:
            out.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """A warm shutdown, as an operator does it: SIGTERM to the worker's main process
    only, so that its pool finishes the tasks it runs; if that takes more than 60 s,
    :func:`conftest.stop_process` (the whole group, then SIGKILL)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            stop_process(proc)
