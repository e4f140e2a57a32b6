"""A least-privilege ACL user, limited to our keys and our commands, runs everything.

This file runs on every server of ``dev.py matrix``: the README's line must apply on
each server the package claims.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
from celery import chord, group, states

from celery_perkey_backend.keys import KeyLayout, acl_rules

from .conftest import running_worker

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def acl_app(make_app: Any, r: redis.Redis, server: Any) -> Any:
    rules = acl_rules(KeyLayout("celery-perkey:")).split()
    r.acl_setuser("perkey", enabled=True, passwords=["+least-privilege"], reset=True)
    r.execute_command("ACL", "SETUSER", "perkey", *rules)
    yield make_app(backend=f"perkey://perkey:least-privilege@127.0.0.1:{server.port}/0")
    r.acl_deluser("perkey")


def test_the_whole_backend_runs_as_the_restricted_user(acl_app: Any, r: redis.Redis) -> None:
    app = acl_app
    tasks = app.tasks
    with running_worker(app):
        assert tasks["t.add"].delay(1, 2).get(timeout=10) == 3
        seen: list[str] = []
        assert (
            tasks["t.progress"]
            .delay(2, 0.01)
            .get(timeout=10, on_message=lambda m: seen.append(m["status"]))
            == "finished"
        )
        assert group(tasks["t.add"].s(i, i) for i in range(5))().get(timeout=10) == [0, 2, 4, 6, 8]
        assert (
            chord(tasks["t.add"].s(i, 1) for i in range(3))(tasks["t.tsum"].s()).get(timeout=10)
            == 6
        )
        saved = group(tasks["t.add"].s(1, 1))()
        saved.get(timeout=10)
        saved.save()
        assert app.GroupResult.restore(saved.id).get(timeout=10) == [2]
        failing = tasks["t.fail"].delay()
        assert failing.get(timeout=10, propagate=False) is not None
    app.AsyncResult(failing.id).forget()
    assert app.backend.stats().our_keys > 0
    app.conf.result_expires = None
    app.backend.store_result("forever", 1, states.SUCCESS)
    summary = app.backend.run_sweep(delete=True, max_age=0)
    assert summary.unlinked > 0
    # The user really is restricted: a stranger's key is out of reach.
    r.set("someone-else", "x")
    with pytest.raises(redis.RedisError, match=r"(?i)NOPERM|no permissions"):
        app.backend.client.get("someone-else")


def test_the_readme_documents_the_same_rules() -> None:
    assert acl_rules(KeyLayout("celery-perkey:")) in README.read_text()


def _readme_line() -> list[str]:
    lines = [line for line in README.read_text().splitlines() if line.startswith("ACL SETUSER")]
    assert len(lines) == 1, lines
    return lines[0].split()


def test_the_readme_line_applies_on_this_server_and_its_user_connects(
    make_app: Any, r: redis.Redis, server: Any
) -> None:
    """Verbatim, as an operator pastes it into redis-cli: the server takes every rule,
    and redis-py's handshake (which tries CLIENT SETINFO) then works for the user."""
    words = _readme_line()
    assert words[:3] == ["ACL", "SETUSER", "perkey"]
    try:
        r.execute_command(*words)
        app = make_app(backend=f"perkey://perkey:password@127.0.0.1:{server.port}/0")
        app.backend.store_result("acl-1", 7, states.SUCCESS)
        assert app.AsyncResult("acl-1").get(timeout=10) == 7
        assert r.acl_getuser("perkey")["enabled"]
    finally:
        r.acl_deluser("perkey")


def test_the_rules_for_this_servers_version_apply_and_refuse_nothing(
    make_app: Any, r: redis.Redis, server: Any
) -> None:
    """Given the server's version, the rules add what that server knows of redis-py's
    handshake: every command the backend and the handshake send is then allowed."""
    version = r.info("server")["redis_version"]
    rules = acl_rules(KeyLayout("celery-perkey:"), version).split()
    r.execute_command("ACL", "LOG", "RESET")
    r.acl_setuser("perkey-v", enabled=True, passwords=["+pw-v"], reset=True)
    try:
        r.execute_command("ACL", "SETUSER", "perkey-v", *rules)
        app = make_app(backend=f"perkey://perkey-v:pw-v@127.0.0.1:{server.port}/0")
        app.backend.store_result("acl-2", 8, states.SUCCESS)
        assert app.AsyncResult("acl-2").get(timeout=10) == 8
        refused = [e for e in r.acl_log() if e.get("username") == "perkey-v"]
        assert refused == []
    finally:
        r.acl_deluser("perkey-v")


def test_the_version_decides_the_handshake_rules() -> None:
    layout = KeyLayout("celery-perkey:")
    assert "+client|setinfo" not in acl_rules(layout)
    assert "+client|setinfo" not in acl_rules(layout, "7.0.15")
    assert "+client|setinfo" not in acl_rules(layout, "7.1.0")
    # Redis 6.2 takes a rule for any subcommand: its handshake is spared refusals too.
    assert "+client|setinfo" in acl_rules(layout, "6.2.14")
    assert "+client|maint_notifications" in acl_rules(layout, "6.2.14")
    assert "+client|maint_notifications" not in acl_rules(layout, "7.2.4")
    assert "+client|setinfo" in acl_rules(layout, "7.2.4")
    assert "+client|setinfo" in acl_rules(layout, "8.0.0")


def test_metrics_and_the_migration_check_run_as_the_restricted_user(
    acl_app: Any, make_app: Any, r: redis.Redis, tmp_path: Path
) -> None:
    from celery_perkey_backend.legacy import survey
    from celery_perkey_backend.prometheus import render

    exporting = make_app(
        backend=acl_app.conf.result_backend, perkey_prometheus_textfile=str(tmp_path / "m.prom")
    )
    exporting.backend.store_result("t1", 1, states.SUCCESS)
    assert exporting.backend.run_sweep().scanned == 1
    assert b"perkey_sweeps_total 1.0" in render(exporting.backend.store)
    r.set("celery-task-meta-old", exporting.backend.encode({"status": "SUCCESS", "result": 1}))
    r.set("celery-taskset-meta-g", exporting.backend.encode({"result": [["g", None], []]}))
    assert survey(exporting.backend.store, exporting.backend.decode_record).in_flight == 2
    assert exporting.GroupResult.restore("g") is not None
