"""`celery worker` subprocesses of `tests/worker_app.py`, started and stopped by tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    """A warm shutdown (SIGTERM to the main process: running tasks finish), then
    SIGKILL to the whole process group if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
