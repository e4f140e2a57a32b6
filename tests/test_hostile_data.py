"""Nothing read back from the server is trusted: a watchers set naming keys that are no
inboxes, an inbox written over with another type, junk in the metrics hash. The hostile
data is written with a plain client; stores go through the backend (and a real worker),
the metrics through the exporter, the sweep and the CLI."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis
from celery import states

from celery_perkey_backend.prometheus import render
from celery_perkey_backend.testing import LocalCluster, free_port

from .conftest import run_cli, running_worker, samples, value


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]


# -- the watchers set -----------------------------------------------------------------


def test_a_watcher_naming_another_task_s_result_is_never_pushed_to(
    app: Any, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    layout = app.backend.layout
    app.backend.store_result("other", "untouched", states.SUCCESS)
    bent = layout.prefix + "i:{x}trailing"  # our inboxes' prefix, not their shape
    r.sadd(layout.watchers("t1"), layout.result("other"), bent)
    with caplog.at_level(logging.WARNING):
        app.backend.store_result("t1", "progress", "PROGRESS")
        app.backend.store_result("t1", "done", states.SUCCESS)
    assert r.llen(layout.result("other")) == 1
    assert app.AsyncResult("other").get(timeout=1) == "untouched"
    assert app.AsyncResult("t1").get(timeout=1) == "done"
    assert not r.exists(bent)
    # Skipped and taken out of the set by the first store, so reported once.
    skipped = [line for line in _warnings(caplog) if "name no inbox of ours" in line]
    assert len(skipped) == 1, _warnings(caplog)
    assert "skipped 2 member(s)" in skipped[0]
    assert "'t1'" in skipped[0]


def test_a_real_inbox_still_gets_its_notification_beside_a_foreign_member(
    make_app: Any, r: redis.Redis
) -> None:
    app = make_app(perkey_multiplex=True)
    layout = app.backend.layout
    app.backend.store_result("other", "untouched", states.SUCCESS)
    inbox = layout.inbox("a-process")
    r.sadd(layout.watchers("t1"), inbox, layout.result("other"))
    app.backend.store_result("t1", "done", states.SUCCESS)
    assert r.llen(inbox) == 1
    assert r.lindex(inbox, 0).startswith(b"R2:t1")
    assert r.llen(layout.result("other")) == 1
    assert app.AsyncResult("other").get(timeout=1) == "untouched"


# -- an inbox of the wrong type -------------------------------------------------------


def test_an_inbox_of_the_wrong_type_never_fails_a_store(
    app: Any, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    layout = app.backend.layout
    inbox = layout.inbox("written-over")
    r.sadd(layout.watchers("t1"), inbox)
    r.set(inbox, "a string written over an inbox")
    with caplog.at_level(logging.WARNING):
        app.backend.store_result("t1", "stored", states.SUCCESS)
    assert app.AsyncResult("t1").get(timeout=1) == "stored"
    # Repaired: a list again, holding the notification, with the inbox's TTL.
    assert r.type(inbox) == b"list"
    assert r.lindex(inbox, 0).startswith(b"R2:t1")
    assert r.pttl(inbox) > 0
    assert any("replaced 1 inbox(es)" in line for line in _warnings(caplog)), _warnings(caplog)


def test_a_worker_s_stores_survive_an_inbox_of_the_wrong_type(
    app: Any, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    layout = app.backend.layout
    ids = [f"w{n}" for n in range(20)]
    inbox = layout.inbox("written-over")
    for task_id in ids:
        r.sadd(layout.watchers(task_id), inbox)
    r.set(inbox, "a string written over an inbox")
    with caplog.at_level(logging.WARNING), running_worker(app):
        results = [app.tasks["t.add"].apply_async((n, n), task_id=tid) for n, tid in enumerate(ids)]
        assert [result.get(timeout=15) for result in results] == [2 * n for n in range(20)]
    assert not [line for line in _warnings(caplog) if "StoreCommandError" in line]
    assert r.type(inbox) == b"list"


def test_on_a_cluster_the_storing_client_pushes_only_to_inboxes_and_repairs_them(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # On a cluster the inboxes live in other slots: the script returns them, the storing
    # client pushes (ResultStore._notify).
    with LocalCluster() as cluster:
        app = make_app(backend=cluster.url, broker_url="memory://")
        layout = app.backend.layout
        client = app.backend.store.client
        app.backend.store_result("other", "untouched", states.SUCCESS)
        inbox = layout.inbox("written-over")
        client.sadd(layout.watchers("t1"), inbox, layout.result("other"))
        client.set(inbox, "a string written over an inbox")
        assert cluster.primary_for_key(inbox) != cluster.primary_for_key(layout.result("t1"))
        with caplog.at_level(logging.WARNING):
            app.backend.store_result("t1", "stored", states.SUCCESS)
        assert app.AsyncResult("t1").get(timeout=5) == "stored"
        assert client.llen(layout.result("other")) == 1
        assert client.type(inbox) == b"list"
        assert client.lindex(inbox, 0).startswith(b"R2:t1")
    warned = [line for line in _warnings(caplog) if "'t1'" in line]
    assert any("skipped 1 member(s)" in line for line in warned), warned
    assert any("replaced 1 inbox(es)" in line for line in warned), warned


# -- the metrics hash -----------------------------------------------------------------


@pytest.fixture
def exporting(make_app: Any) -> Any:
    app = make_app(perkey_prometheus_port=free_port())  # exporting on: sweeps are recorded
    app.backend.store_result("t1", 1, states.SUCCESS)
    app.backend.run_sweep()
    return app


def test_a_junk_metrics_field_is_reported_and_ignored(
    exporting: Any, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = exporting.backend.layout.metrics
    r.hset(metrics, "sweeps", "junk")
    r.hset(metrics, "stats", '{"by_kind": "junk", "db_keys": 3}')
    with caplog.at_level(logging.WARNING):
        text = render(exporting.backend.store).decode()
    assert value(text, "perkey_up") == 1
    assert value(text, "perkey_sweeps_total") == 0  # the junk counter, ignored
    assert value(text, "perkey_swept_keys_total", **{"class": "healthy"}) == 1
    assert value(text, "perkey_db_keys") == 3
    assert value(text, "perkey_keys", kind="result") == 0  # by_kind, ignored
    assert samples(text)
    warned = [line for line in _warnings(caplog) if "metrics hash" in line]
    assert len(warned) == 1, _warnings(caplog)
    assert "'sweeps'" in warned[0]
    assert "'stats.by_kind'" in warned[0]


def test_perkey_metrics_shows_the_rest_of_a_junk_hash(exporting: Any, r: redis.Redis) -> None:
    r.hset(exporting.backend.layout.metrics, "last_sweep_ms", "junk")
    result = run_cli(exporting, "metrics")
    assert result.exit_code == 0, result.output
    assert value(result.output, "perkey_sweeps_total") == 1
    assert value(result.output, "perkey_last_sweep_timestamp_seconds") is None


def test_a_sweep_never_fails_after_its_work_on_a_junk_metrics_hash(
    exporting: Any, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    backend = exporting.backend
    metrics = backend.layout.metrics
    r.hset(metrics, mapping={"sweeps": "junk", "swept:healthy": "1.5", "stats_ms": "junk"})
    r.persist(backend.layout.result("t1"))
    with caplog.at_level(logging.WARNING):
        summary = backend.run_sweep()
    assert summary.ttl_set == 1  # its work
    assert r.pttl(backend.layout.result("t1")) > 0
    # The junk counters were set anew, the key metrics recorded again.
    assert r.hget(metrics, "sweeps") == b"1"
    assert r.hget(metrics, "swept:healthy") == b"0"
    assert int(r.hget(metrics, "stats_ms")) > 0
    warned = [line for line in _warnings(caplog) if "metrics hash" in line]
    assert any("'sweeps'" in line and "'swept:healthy'" in line for line in warned), warned
    assert any("'stats_ms'" in line for line in warned), warned
    # The hash of another type: the sweep still ends well, and says so.
    r.delete(metrics)
    r.set(metrics, "not a hash")
    with caplog.at_level(logging.WARNING):
        assert backend.run_sweep().scanned >= 1
    assert any("not recorded for Prometheus" in line for line in _warnings(caplog))
