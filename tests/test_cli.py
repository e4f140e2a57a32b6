"""`celery -A proj perkey …`: in-process through click's runner, and once as a subprocess
the way an operator runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import states

from celery_perkey_backend.testing import EmbeddedServer, free_port

from .conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def test_the_command_runs_under_celerys_own_cli(server: Any, app: Any, r: redis.Redis) -> None:
    app.backend.store_result("t1", 1, states.SUCCESS)
    env = dict(os.environ, PERKEY_TEST_PORT=str(server.port))
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.worker_app", "perkey", "stats", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["by_kind"] == {"result": 1}


def test_stats_table_and_json(app: Any, r: redis.Redis) -> None:
    for i in range(3):
        app.backend.store_result(f"t{i}", i, states.SUCCESS)
    table = run_cli(app, "stats")
    assert table.exit_code == 0, table.output
    assert "keys: result" in table.stdout
    figures = json.loads(run_cli(app, "stats", "--json").stdout)
    assert figures["by_kind"] == {"result": 3}
    assert figures["no_ttl"] == 0


def test_sweep_dry_run_then_for_real(make_app: Any, r: redis.Redis) -> None:
    app = make_app()
    app.conf.result_expires = None
    app.backend.store_result("t1", 1, states.SUCCESS)
    key = app.backend.layout.result("t1")
    dry = run_cli(app, "sweep", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"would set ttl on {key}" in dry.stdout
    assert r.ttl(key) == -1
    real = json.loads(run_cli(app, "sweep", "--json").stdout)
    assert real["ttl_set"] == 1
    assert r.ttl(key) > 0


def test_sweep_delete_with_max_age(app: Any, r: redis.Redis) -> None:
    app.backend.store_result("t1", 1, states.SUCCESS)
    kept = json.loads(run_cli(app, "sweep", "--delete", "--max-age", "1d", "--json").stdout)
    assert kept["unlinked"] == 0
    gone = json.loads(run_cli(app, "sweep", "--delete", "--max-age", "0", "--json").stdout)
    assert gone["unlinked"] == 1
    assert r.dbsize() == 0


def test_bad_max_age_is_a_usage_error(app: Any, r: redis.Redis) -> None:
    done = run_cli(app, "sweep", "--max-age", "soon")
    assert done.exit_code == 2
    assert "Invalid value for '--max-age': 'soon' is not a duration" in done.stderr
    assert done.stderr.count("max-age") == 1


def test_stats_and_sweep_agree_on_keys_without_a_ttl(make_app: Any, r: redis.Redis) -> None:
    app = make_app()
    app.conf.result_expires = None
    for i in range(5):
        app.backend.store_result(f"t{i}", i, states.SUCCESS)
    for i in range(25):  # keys under our prefix of a type we never write
        r.set(app.backend.layout.result(f"odd{i:02}"), "a string")
    table = run_cli(app, "stats").stdout
    assert "without ttl (the sweep fixes these)  5" in table
    assert "unexpected type (never touched)      25" in table
    assert "odd" not in table
    assert re.search(r"used memory\s+\d+\.\d (KiB|MiB|GiB)", table)
    verbose = run_cli(app, "stats", "--verbose").stdout
    listed = [line.strip() for line in verbose.splitlines() if "odd" in line]
    assert len(listed) == 20
    assert "keys of an unexpected type (first 20):" in verbose
    swept = json.loads(run_cli(app, "sweep", "--json").stdout)
    assert swept["ttl_set"] == 5
    assert swept["by_class"]["unexpected"] == 25
    assert json.loads(run_cli(app, "stats", "--json").stdout)["no_ttl"] == 0


def test_sweep_skipped_by_the_lock_exits_5(app: Any, r: redis.Redis) -> None:
    r.set(app.backend.layout.sweep_lock, "another sweeper", ex=30)
    done = run_cli(app, "sweep")
    assert done.exit_code == 5
    assert "skipped" in done.stdout


def test_inspect(app: Any, r: redis.Redis) -> None:
    app.backend.store_result("t1", {"answer": 42}, states.SUCCESS)
    shown = run_cli(app, "inspect", "t1")
    assert shown.exit_code == 0, shown.output
    assert "SUCCESS" in shown.stdout
    assert app.backend.layout.result("t1") in shown.stdout
    report = json.loads(run_cli(app, "inspect", "t1", "--json").stdout)
    assert report["keys"][0]["meta"]["result"] == {"answer": 42}
    assert report["keys"][0]["ttl_ms"] > 0
    missing = run_cli(app, "inspect", "nope")
    assert missing.exit_code == 1


def test_inspect_shows_garbage_safely(app: Any, r: redis.Redis) -> None:
    r.rpush(app.backend.layout.result("bad"), b"\x1b[31m\x00garbage")
    shown = run_cli(app, "inspect", "bad")
    assert shown.exit_code == 0
    assert "\x1b" not in shown.stdout
    assert "unreadable" in shown.stdout
    assert "UNREADABLE" in shown.stdout


COMMANDS = [["stats"], ["sweep"], ["sweep", "--dry-run"], ["inspect", "t1"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_unreachable_server_is_one_masked_line(make_app: Any, command: list[str]) -> None:
    app = make_app(backend=f"perkey://:hunter2@127.0.0.1:{free_port()}/0")
    done = run_cli(app, *command)
    assert done.exit_code == 3
    assert "hunter2" not in done.output
    assert "127.0.0.1" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_wrong_password_is_one_masked_line(make_app: Any, command: list[str]) -> None:
    with EmbeddedServer(args=["--requirepass", "right-secret"]) as guarded:
        app = make_app(backend=f"perkey://:hunter2@127.0.0.1:{guarded.port}/0")
        done = run_cli(app, *command)
    assert done.exit_code == 8  # a configuration error, not an outage
    assert "hunter2" not in done.output
    assert "refused the password" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_app_without_perkey_exits_4(make_app: Any, server: Any) -> None:
    app = make_app(backend=f"redis://127.0.0.1:{server.port}/0")
    done = run_cli(app, "stats")
    assert done.exit_code == 4
    assert "not perkey" in done.stderr


def test_metrics_prints_or_writes_what_a_scrape_sees(
    app: Any, r: redis.Redis, tmp_path: Path
) -> None:
    app.backend.store_result("t1", 1, states.SUCCESS)
    printed = run_cli(app, "metrics")
    assert printed.exit_code == 0, printed.output
    assert "perkey_up 1.0" in printed.stdout
    assert "perkey_sweeps_total 0.0" in printed.stdout
    target = tmp_path / "perkey.prom"
    assert run_cli(app, "metrics", "--textfile", str(target)).exit_code == 0
    assert "perkey_up 1.0" in target.read_text()
