"""`celery -A proj perkey …`, driven as an operator drives it: a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis
from celery import states

from celery_perkey_backend.testing import free_port

ROOT = Path(__file__).resolve().parent.parent


def celery(server: Any, *args: str, backend: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PERKEY_TEST_PORT=str(server.port))
    if backend:
        env["PERKEY_TEST_BACKEND"] = backend
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.worker_app", "perkey", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_stats_table_and_json(server: Any, app: Any, r: redis.Redis) -> None:
    for i in range(3):
        app.backend.store_result(f"t{i}", i, states.SUCCESS)
    table = celery(server, "stats")
    assert table.returncode == 0, table.stderr
    assert "keys: result" in table.stdout
    figures = json.loads(celery(server, "stats", "--json").stdout)
    assert figures["by_kind"] == {"result": 3}
    assert figures["no_ttl"] == 0


def test_sweep_dry_run_then_for_real(server: Any, make_app: Any, r: redis.Redis) -> None:
    app = make_app()
    app.conf.result_expires = None
    app.backend.store_result("t1", 1, states.SUCCESS)
    key = app.backend.layout.result("t1")
    dry = celery(server, "sweep", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would set ttl on {key}" in dry.stdout
    assert r.ttl(key) == -1
    real = json.loads(celery(server, "sweep", "--json").stdout)
    assert real["ttl_set"] == 1
    assert r.ttl(key) > 0


def test_sweep_delete_with_max_age(server: Any, app: Any, r: redis.Redis) -> None:
    app.backend.store_result("t1", 1, states.SUCCESS)
    kept = json.loads(celery(server, "sweep", "--delete", "--max-age", "1d", "--json").stdout)
    assert kept["unlinked"] == 0
    gone = json.loads(celery(server, "sweep", "--delete", "--max-age", "0", "--json").stdout)
    assert gone["unlinked"] == 1
    assert r.dbsize() == 0


def test_bad_max_age_is_a_usage_error(server: Any, r: redis.Redis) -> None:
    done = celery(server, "sweep", "--max-age", "soon")
    assert done.returncode == 2
    assert "--max-age" in done.stderr


def test_sweep_skipped_by_the_lock_exits_5(server: Any, app: Any, r: redis.Redis) -> None:
    r.set(app.backend.layout.sweep_lock, "another sweeper", ex=30)
    done = celery(server, "sweep")
    assert done.returncode == 5
    assert "skipped" in done.stdout


def test_inspect(server: Any, app: Any, r: redis.Redis) -> None:
    app.backend.store_result("t1", {"answer": 42}, states.SUCCESS)
    shown = celery(server, "inspect", "t1")
    assert shown.returncode == 0, shown.stderr
    assert "SUCCESS" in shown.stdout
    assert app.backend.layout.result("t1") in shown.stdout
    report = json.loads(celery(server, "inspect", "t1", "--json").stdout)
    assert report["keys"][0]["meta"]["result"] == {"answer": 42}
    assert report["keys"][0]["ttl_ms"] > 0
    missing = celery(server, "inspect", "nope")
    assert missing.returncode == 1


def test_inspect_shows_garbage_safely(server: Any, app: Any, r: redis.Redis) -> None:
    r.rpush(app.backend.layout.result("bad"), b"\x1b[31m\x00garbage")
    shown = celery(server, "inspect", "bad")
    assert shown.returncode == 0
    assert "\x1b" not in shown.stdout
    assert "unreadable" in shown.stdout
    assert "UNREADABLE" in shown.stdout


def test_unreachable_server_is_one_masked_line(server: Any) -> None:
    url = f"perkey://:hunter2@127.0.0.1:{free_port()}/0"
    done = celery(server, "stats", backend=url)
    assert done.returncode == 3
    assert "hunter2" not in done.stderr + done.stdout
    assert "127.0.0.1" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_app_without_perkey_exits_4(server: Any) -> None:
    done = celery(server, "stats", backend=f"redis://127.0.0.1:{server.port}/0")
    assert done.returncode == 4
    assert "not perkey" in done.stderr
