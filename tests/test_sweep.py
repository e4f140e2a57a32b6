"""The sweep: only our keys, classified, fixed by policy, under a lock, never too eagerly."""

from __future__ import annotations

import functools
import threading
import tracemalloc
from typing import Any

import pytest
import redis
from celery import states

from celery_perkey_backend import ConfigurationError
from celery_perkey_backend.settings import parse_duration
from celery_perkey_backend.sweep import SweepOptions, SweepSummary, sweep
from celery_perkey_backend.testing import EmbeddedServer

from .conftest import wait_until


def _old(r: redis.Redis, key: str, age_s: float, ttl: int | None = None, letter: str = "S") -> None:
    """A result key as the store script writes it, last written ``age_s`` ago."""
    seconds, micros = r.time()
    written = seconds * 1000 + micros // 1000 - int(age_s * 1000)
    r.delete(key)
    r.rpush(key, f"{letter}{written}|".encode() + b'{"status": "SUCCESS", "result": 1}')
    if ttl:
        r.expire(key, ttl)


@pytest.fixture
def no_ttl_app(make_app: Any) -> Any:
    app = make_app()
    app.conf.result_expires = None
    return app


def test_only_our_keys_are_touched_even_with_a_glob_prefix(make_app: Any, r: redis.Redis) -> None:
    app = make_app(perkey_key_prefix="app[1]:", result_expires=None)
    app.backend.store_result("t1", 1, states.SUCCESS)
    strangers = ["app1:r:{t1}", "appx:r:{t2}", "app[1]", "other:key", "app\\[1]:r:{t3}"]
    for key in strangers:
        r.set(key, "theirs")
    summary = sweep(app.backend, delete=True, max_age=0)
    assert summary.scanned == 1
    for key in strangers:
        assert r.get(key) == b"theirs"
        assert r.ttl(key) == -1


def test_classes_and_default_policy(no_ttl_app: Any, r: redis.Redis) -> None:
    backend = no_ttl_app.backend
    layout = backend.layout
    _old(r, layout.result("healthy"), age_s=60, ttl=3600)
    backend.store_result("fresh", 1, states.SUCCESS)  # no TTL: result_expires is None
    _old(r, layout.result("old"), age_s=3 * 86400)
    _old(r, layout.result("old-with-ttl"), age_s=3 * 86400, ttl=3600)
    r.set(layout.result("wrong"), "a string where a list belongs")
    r.rpush(layout.chord("gone", "j"), b"part")  # its size key is gone
    summary = sweep(backend)
    assert summary.by_class == {
        "healthy": 1,
        "no_ttl": 1,
        "too_old": 2,
        "leftover": 1,
        "unexpected": 1,
    }
    assert summary.ttl_set == 3
    assert summary.unlinked == 0
    for key in ("fresh", "old"):
        assert 86000 < r.ttl(layout.result(key)) <= 86400
    assert r.ttl(layout.chord("gone", "j")) > 0
    assert r.ttl(layout.result("wrong")) == -1  # reported, never touched
    assert r.get(layout.result("wrong")) == b"a string where a list belongs"


def test_delete_policy_unlinks_only_what_is_too_old(no_ttl_app: Any, r: redis.Redis) -> None:
    backend = no_ttl_app.backend
    layout = backend.layout
    _old(r, layout.result("old"), age_s=2 * 86400)
    backend.store_result("young", 1, states.SUCCESS)
    backend.store_result("progressing", {"p": 1}, "PROGRESS")
    summary = sweep(backend, delete=True, max_age="1d")
    assert summary.unlinked == 1
    assert summary.bytes_reclaimed > 0
    assert not r.exists(layout.result("old"))
    assert r.exists(layout.result("young"))
    assert r.ttl(layout.result("young")) > 0
    assert r.ttl(layout.state("progressing")) > 0


def test_dry_run_reports_exactly_and_changes_nothing(no_ttl_app: Any, r: redis.Redis) -> None:
    backend = no_ttl_app.backend
    layout = backend.layout
    _old(r, layout.result("old"), age_s=2 * 86400)
    backend.store_result("young", 1, states.SUCCESS)
    before = {k: r.dump(k) for k in r.keys("*")}
    planned = sweep(backend, delete=True, max_age="1d", dry_run=True)
    assert {k: r.dump(k) for k in r.keys("*")} == before
    assert all(r.ttl(k) == -1 for k in r.keys("*"))
    assert sorted(planned.planned) == [
        ("ttl", layout.result("young")),
        ("unlink", layout.result("old")),
    ]
    done = sweep(backend, delete=True, max_age="1d")
    assert (done.ttl_set, done.unlinked) == (planned.ttl_set, planned.unlinked)


def test_keys_written_during_the_sweep_survive(no_ttl_app: Any, r: redis.Redis) -> None:
    backend = no_ttl_app.backend
    layout = backend.layout
    ids = [f"t{i}" for i in range(20)]
    for task_id in ids:
        # FAILUREs, so that storing again replaces them (a SUCCESS is final).
        _old(r, layout.result(task_id), age_s=10, letter="F")

    def write_during(scanned: int, total: int) -> None:
        # After the first batch: store every result again, and some new ones.
        if scanned == 1:
            for task_id in ids:
                backend.store_result(task_id, "rewritten", states.SUCCESS)
            for i in range(5):
                backend.store_result(f"new{i}", i, states.SUCCESS)

    summary = sweep(backend, progress=write_during, delete=True, max_age=0, batch_size=1)
    survivors = {k.decode() for k in r.keys(layout.match_all)}
    assert summary.unlinked <= 1
    assert len(survivors) >= 24
    assert all(layout.result(f"new{i}") in survivors for i in range(5))


def test_two_sweeps_at_once_only_one_runs(no_ttl_app: Any, r: redis.Redis) -> None:
    backend = no_ttl_app.backend
    for i in range(40):
        backend.store_result(f"t{i}", i, states.SUCCESS)
    results: list[SweepSummary] = []
    sweeping, second_done = threading.Event(), threading.Event()

    def hold(scanned: int, total: int) -> None:
        sweeping.set()  # the first sweep holds the lock here...
        second_done.wait(10)  # ...until the second has tried

    first = threading.Thread(target=lambda: results.append(sweep(backend, progress=hold)))
    first.start()
    assert sweeping.wait(10)
    second = sweep(backend)
    second_done.set()
    first.join(10)
    assert second.skipped_locked
    assert second.scanned == 0
    assert not results[0].skipped_locked
    assert results[0].ttl_set == 40
    assert not r.exists(backend.layout.sweep_lock)


def test_a_crashed_sweepers_lock_expires(no_ttl_app: Any, r: redis.Redis) -> None:
    backend = no_ttl_app.backend
    backend.store_result("t1", 1, states.SUCCESS)
    r.set(backend.layout.sweep_lock, "crashed-sweeper", px=300)
    assert sweep(backend).skipped_locked
    wait_until(lambda: not r.exists(backend.layout.sweep_lock), "the lock expired")
    assert sweep(backend).ttl_set == 1


def _sweep_losing_the_lock(backend: Any, r: redis.Redis, batch_size: int) -> Any:
    """Sweep ten results without TTL while another sweeper takes the lock after the
    first batch; the sweep's summary."""
    for i in range(10):
        backend.store_result(f"t{i}", i, states.SUCCESS)

    def steal(scanned: int, total: int) -> None:
        r.set(backend.layout.sweep_lock, "somebody else")

    return sweep(backend, batch_size=batch_size, progress=steal)


def test_lock_lost_midway_stops_the_sweep(no_ttl_app: Any, r: redis.Redis) -> None:
    backend = no_ttl_app.backend
    summary = _sweep_losing_the_lock(backend, r, batch_size=2)
    # It stopped after the first batch of two (one of them may be the lock key itself,
    # which is not counted: SCAN's order depends on the server).
    assert 1 <= summary.scanned <= 2
    assert r.get(backend.layout.sweep_lock) == b"somebody else"


def test_a_batch_without_the_lock_touches_no_key(no_ttl_app: Any, r: redis.Redis) -> None:
    # On one server the batch's own script checks the lock: once another sweeper holds
    # it, not one more key gets a TTL.
    backend = no_ttl_app.backend
    summary = _sweep_losing_the_lock(backend, r, batch_size=3)
    without_ttl = [k for k in r.keys(backend.layout.result("*")) if r.pttl(k) == -1]
    assert 1 <= summary.ttl_set <= 3
    assert len(without_ttl) == 10 - summary.ttl_set


@pytest.mark.parametrize(
    ("batch_size", "scan_count"), [(1, 1), (7, 3), (50, 10), (200, 1000), (1000, 10)]
)
def test_every_key_is_swept_whatever_the_batch_and_page_sizes(
    no_ttl_app: Any, r: redis.Redis, batch_size: int, scan_count: int
) -> None:
    # Pages come in their own round trip or with the batch before; batches span pages.
    backend = no_ttl_app.backend
    for i in range(300):
        _old(r, backend.layout.result(f"t{i}"), age_s=10)
    summary = sweep(backend, batch_size=batch_size, scan_count=scan_count)
    assert summary.scanned >= 300  # SCAN may return a key twice
    assert summary.ttl_set == 300
    assert not [k for k in r.keys(backend.layout.result("*")) if r.pttl(k) == -1]
    assert not r.exists(backend.layout.sweep_lock)


def test_cleanup_is_the_sweep_and_logs_one_line(
    no_ttl_app: Any, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    no_ttl_app.backend.store_result("t1", 1, states.SUCCESS)
    with caplog.at_level("INFO", logger="celery_perkey_backend.sweep"):
        no_ttl_app.backend.cleanup()
    lines = [rec.getMessage() for rec in caplog.records if "perkey sweep" in rec.getMessage()]
    assert len(lines) == 1
    assert "no_ttl=1" in lines[0]
    assert "ttl set=1" in lines[0]
    assert r.ttl(no_ttl_app.backend.layout.result("t1")) > 0


def test_settings_drive_the_sweep(make_app: Any) -> None:
    app = make_app(
        perkey_sweep_max_age="2h",
        perkey_sweep_delete=True,
        perkey_sweep_ttl=60,
        perkey_sweep_batch_size=7,
    )
    options_of = functools.partial(SweepOptions.from_settings, app.backend.settings)
    options = options_of()
    assert (options.max_age, options.delete, options.ttl, options.batch_size) == (
        7200.0,
        True,
        60.0,
        7,
    )
    assert options_of(max_age=5, dry_run=True).max_age == 5.0
    # SCAN's COUNT follows the batch size unless it is set.
    assert options_of().scan_count == 7
    assert options_of(batch_size=50).scan_count == 50
    assert options_of(scan_count=30).scan_count == 30
    assert (
        SweepOptions.from_settings(make_app(perkey_sweep_scan_count=40).backend.settings).scan_count
        == 40
    )
    with pytest.raises(ConfigurationError, match="bogus"):
        options_of(bogus=1)
    with pytest.raises(ConfigurationError, match="max_age"):
        options_of(max_age="soon")


@pytest.mark.parametrize(
    ("text", "seconds"), [(5, 5.0), ("90s", 90.0), ("30m", 1800.0), ("1d", 86400.0), ("2", 2.0)]
)
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


def _populate(count: int, make_app: Any) -> tuple[EmbeddedServer, Any]:
    server = EmbeddedServer(args=["--enable-debug-command", "local"]).start()
    client = redis.Redis(port=server.port)
    # DEBUG POPULATE writes TTL-less strings named like saved groups of ours.
    client.execute_command("DEBUG", "POPULATE", count, "celery-perkey:g:{pop}", 16)
    client.close()
    return server, make_app(backend=f"perkey://127.0.0.1:{server.port}/0")


def _sweep_a_large_keyspace(count: int, make_app: Any) -> None:
    server, app = _populate(count, make_app)
    try:
        tracemalloc.start()
        summary = sweep(app.backend, batch_size=1000, scan_count=1000)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rate = summary.scanned / summary.duration
        print(f"\nsweep of {count} keys: {summary.duration:.1f}s, {rate:,.0f} keys/s, "
              f"peak Python memory {peak / 1e6:.1f} MB")  # fmt: skip
        assert summary.scanned >= count
        assert summary.ttl_set == count
        # Batches, not the keyspace, live in memory.
        assert peak < 30e6
    finally:
        server.stop()


def test_sweep_of_a_large_keyspace_scaled_down(make_app: Any) -> None:
    _sweep_a_large_keyspace(20_000, make_app)


@pytest.mark.slow
def test_sweep_of_a_large_keyspace(make_app: Any) -> None:
    _sweep_a_large_keyspace(100_000, make_app)


@pytest.mark.slow
def test_sweep_of_a_million_keys(make_app: Any) -> None:
    _sweep_a_large_keyspace(1_000_000, make_app)


def test_sweep_task_on_an_in_process_worker(make_app: Any, r: redis.Redis) -> None:
    from .conftest import running_worker

    app = make_app()
    app.conf.result_expires = None
    with running_worker(app):
        app.backend.store_result("t1", 1, states.SUCCESS)
        summary = app.send_task("celery_perkey_backend.sweep", kwargs={"max_age": "1h"})
        # t1, and the sweep task's own STARTED state: both were stored without a TTL.
        assert summary.get(timeout=10)["ttl_set"] >= 1
    assert r.ttl(app.backend.layout.result("t1")) > 0
