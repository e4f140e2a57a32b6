"""A real `celery worker` subprocess, configured only through `result_backend`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import chord, group

from celery_perkey_backend.testing import EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def worker_process(server: Any, r: redis.Redis) -> Iterator[Any]:
    env = dict(os.environ, PERKEY_TEST_PORT=str(server.port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.worker_app", "worker",
         "--pool=prefork", "--concurrency=2", "--loglevel=WARNING",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=env,
    )  # fmt: skip
    os.environ["PERKEY_TEST_PORT"] = str(server.port)
    from tests import worker_app

    yield worker_app
    proc.terminate()
    proc.wait(30)


def test_subprocess_worker_round_trip(worker_process: Any, r: redis.Redis) -> None:
    wa = worker_process
    assert wa.mul.delay(6, 7).get(timeout=60) == 42
    seen: list[str] = []
    assert wa.steps.delay(3).get(timeout=30, on_message=lambda m: seen.append(m["status"])) == 3
    assert seen[-1] == "SUCCESS"
    assert "PROGRESS" in seen
    with pytest.raises(ValueError, match="subprocess failure"):
        wa.fail.delay().get(timeout=30)
    assert group(wa.mul.s(i, 2) for i in range(10))().get(timeout=30) == [i * 2 for i in range(10)]
    assert chord(wa.mul.s(i, 1) for i in range(5))(wa.total.s()).get(timeout=30) == 10
    keys = r.keys("*")
    assert keys and all(k.startswith(b"celery-perkey:") for k in keys)
    assert all(r.pttl(k) > 0 for k in keys)


def test_beat_makes_no_subscription(tmp_path: Path) -> None:
    # A server of its own: other tests' redis:// clients in this process may still hold
    # channels on the shared one.
    with EmbeddedServer() as own:
        r = redis.Redis(port=own.port)
        env = dict(os.environ, PERKEY_TEST_PORT=str(own.port), PERKEY_TEST_BROKER="memory://")
        # Logged once the task is published (the result backend sees it as sent).
        _beat_until(tmp_path / "schedule", env, "w.mul sent. id->")
        stats = r.info("commandstats")
        assert not {"cmdstat_subscribe", "cmdstat_psubscribe", "cmdstat_ssubscribe"} & set(stats)
        assert r.pubsub_channels() == []
        r.close()


def _beat_until(schedule: Path, env: dict[str, str], marker: str, timeout: float = 90.0) -> str:
    """Run ``celery beat`` until its log shows ``marker``, then stop it; its log.

    Beat is stopped on what it logs, not after a fixed time: on a loaded machine
    importing Celery alone can take seconds."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.worker_app", "beat",
         "-s", str(schedule), "--loglevel=DEBUG"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        seen.wait(timeout)
    finally:
        proc.terminate()  # beat stores its schedule as it stops
        proc.wait(30)
        reader.join(30)
    log = "".join(lines)
    assert seen.is_set(), f"beat never logged {marker!r} in {timeout} s:\n{log}"
    return log


def test_beat_schedules_backend_cleanup_with_no_configuration(
    server: Any, r: redis.Redis, tmp_path: Path
) -> None:
    import shelve

    env = dict(os.environ, PERKEY_TEST_PORT=str(server.port), PERKEY_TEST_BROKER="memory://")
    schedule = tmp_path / "schedule"
    # Logged once the scheduler is set up, which installs and stores the default entries.
    _beat_until(schedule, env, "beat: Ticking with max interval")
    with shelve.open(str(schedule), flag="r") as stored:
        entries = stored["entries"]
    assert "celery.backend_cleanup" in entries
    assert entries["celery.backend_cleanup"].task == "celery.backend_cleanup"


def test_sweep_task_runs_on_a_worker_configured_only_by_result_backend(
    server: Any, make_app: Any, r: redis.Redis, tmp_path: Path
) -> None:
    writer = make_app()
    writer.conf.result_expires = None
    for i in range(5):
        writer.backend.store_result(f"t{i}", i, "SUCCESS")
    env = dict(os.environ, PERKEY_TEST_PORT=str(server.port), PERKEY_TEST_SWEEP_EVERY="0.5")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.worker_app", "worker",
         "--pool=solo", "--loglevel=INFO", "--without-gossip", "--without-mingle",
         "--without-heartbeat"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # Published before the dry run below, so the solo worker runs it first.
        _beat_until(tmp_path / "schedule", env, "celery_perkey_backend.sweep sent. id->")
        direct = make_app().send_task("celery_perkey_backend.sweep", kwargs={"dry_run": True})
        summary = direct.get(timeout=30)
        assert summary["dry_run"] is True
        assert summary["skipped_locked"] is False
    finally:
        worker.terminate()
        out, _ = worker.communicate(timeout=30)
    assert "unregistered" not in out.lower()
    assert "celery_perkey_backend.sweep" in out
    assert all(r.ttl(writer.backend.layout.result(f"t{i}")) > 0 for i in range(5))
