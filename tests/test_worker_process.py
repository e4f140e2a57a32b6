"""A real `celery worker` subprocess, configured only through `result_backend`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import chord, group

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


def test_beat_makes_no_subscription(server: Any, r: redis.Redis, tmp_path: Path) -> None:
    env = dict(os.environ, PERKEY_TEST_PORT=str(server.port), PERKEY_TEST_BROKER="memory://")
    r.config_resetstat()
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.worker_app", "beat",
         "-s", str(tmp_path / "schedule"), "--loglevel=INFO"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "Sending due task often" in out
    stats = r.info("commandstats")
    assert not {"cmdstat_subscribe", "cmdstat_psubscribe", "cmdstat_ssubscribe"} & set(stats)
    assert r.pubsub_channels() == []


def _run_for(args: list[str], env: dict[str, str], seconds: float) -> str:
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.worker_app", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    return out


def test_beat_schedules_backend_cleanup_with_no_configuration(
    server: Any, r: redis.Redis, tmp_path: Path
) -> None:
    import shelve

    env = dict(os.environ, PERKEY_TEST_PORT=str(server.port), PERKEY_TEST_BROKER="memory://")
    schedule = tmp_path / "schedule"
    _run_for(["beat", "-s", str(schedule), "--loglevel=INFO"], env, 3)
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
        beat_log = _run_for(["beat", "-s", str(tmp_path / "schedule"), "--loglevel=INFO"], env, 4)
        assert "celery_perkey_backend.sweep" in beat_log
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
