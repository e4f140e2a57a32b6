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
