"""Key metrics and their Prometheus export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
from celery import states

from celery_perkey_backend import ConfigurationError
from celery_perkey_backend.prometheus import render, serve
from celery_perkey_backend.stats import collect_stats
from celery_perkey_backend.testing import free_port

from .conftest import samples, value


def _fill(make_app: Any, r: redis.Redis) -> Any:
    app = make_app(result_expires=600)
    for i in range(30):
        app.backend.store_result(f"t{i}", i, states.SUCCESS)
    app.backend.store_result("running", {"p": 1}, "PROGRESS")
    timeless = make_app()
    timeless.conf.result_expires = None
    for i in range(5):
        timeless.backend.store_result(f"forever{i}", i, states.SUCCESS)
    r.set(app.backend.layout.group("g1"), "saved group", ex=7 * 86400 + 60)
    r.set(app.backend.layout.result("odd"), "a string")
    for i in range(20):
        r.set(f"someone-else:{i}", i)
    return app


def test_stats_counts_and_histogram(make_app: Any, r: redis.Redis) -> None:
    app = _fill(make_app, r)
    stats = app.backend.stats()
    assert not stats.sampled
    assert stats.by_kind == {"group": 1, "progress": 1, "result": 36}
    assert stats.our_keys == 38
    assert stats.db_keys == 58
    assert stats.ttl_histogram == {"<1m": 0, "<1h": 31, "<1d": 0, "<7d": 0, ">=7d": 1}
    # The string under a result key is of a type we never write: counted apart, named,
    # and not among the keys without a TTL (the sweep never touches it).
    assert stats.no_ttl == 5
    assert stats.unexpected_type == 1
    assert stats.unexpected_keys == [app.backend.layout.result("odd")]
    assert stats.oldest_no_ttl_age is not None
    assert 0 <= stats.oldest_no_ttl_age < 60
    assert stats.bytes_per_key is not None
    assert 20 < stats.bytes_per_key < 1000
    assert stats.used_memory > 0


def test_stats_samples_a_large_keyspace_and_says_so(make_app: Any, r: redis.Redis) -> None:
    app = make_app(result_expires=600)
    pipe = r.pipeline()
    for i in range(3000):
        pipe.rpush(app.backend.layout.result(f"t{i}"), b"S1|x")
        pipe.set(f"other:{i}", 1)
    pipe.execute()
    stats = collect_stats(app.backend, sample_limit=1000)
    assert stats.sampled
    assert stats.examined == 1000
    # Half the keys are ours: the estimate lands near 3000.
    assert 2400 < stats.by_kind["result"] < 3600


def test_prometheus_counts_of_every_sweeper_add_up_in_redis(
    make_app: Any, r: redis.Redis, tmp_path: Path
) -> None:
    target = tmp_path / "perkey.prom"
    app = _fill(make_app, r)
    # Two backends, as two pool processes would have: the counts live in Redis.
    one = make_app(perkey_prometheus_textfile=str(target))
    other = make_app(perkey_prometheus_textfile=str(target))
    one.backend.run_sweep()
    other.backend.run_sweep(dry_run=True)  # decides, changes nothing: not counted
    r.set(other.backend.layout.sweep_lock, "someone else", px=5000)
    assert other.backend.run_sweep().skipped_locked  # not counted either
    r.delete(other.backend.layout.sweep_lock)
    other.backend.run_sweep()
    text = target.read_text()
    assert text == render(app.backend.store).decode()
    figures = samples(text)
    assert figures[("perkey_sweeps_total", ())] == 2
    assert figures[("perkey_sweep_ttl_set_total", ())] == 5  # the first sweep set them all
    assert figures[("perkey_swept_keys_total", (("class", "no_ttl"),))] == 5
    assert figures[("perkey_swept_keys_total", (("class", "healthy"),))] == 32 + 37
    assert figures[("perkey_keys", (("kind", "result"),))] == 36
    assert figures[("perkey_keys", (("kind", "chord"),))] == 0  # every label, every time
    assert figures[("perkey_keys_without_ttl", ())] == 0
    assert figures[("perkey_unexpected_keys", ())] == 1
    assert all(name.startswith("perkey_") for name, _ in figures)
    # The hash that holds them is no key the sweep or stats count.
    assert r.exists(app.backend.layout.metrics)
    assert app.backend.stats().our_keys == 38


def test_a_failing_sweep_is_counted(make_app: Any, r: redis.Redis) -> None:
    app = make_app(perkey_prometheus_port=free_port())
    with pytest.raises(ConfigurationError):
        app.backend.run_sweep(max_age="banana")
    assert value(render(app.backend.store).decode(), "perkey_sweep_failures_total") == 1


def test_an_unreachable_server_renders_up_0(make_app: Any) -> None:
    app = make_app(
        backend=f"perkey://127.0.0.1:{free_port()}/0",
        perkey_prometheus_port=free_port(),
        result_backend_transport_options={"retry_policy": {"max_retries": 0}},
    )
    assert samples(render(app.backend.store).decode()) == {("perkey_up", ()): 0}


def test_a_taken_port_is_no_error(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import socket
    import urllib.request

    with socket.socket() as taken, caplog.at_level(logging.WARNING, "celery_perkey_backend"):
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve(app.backend.store, port) is False
    assert "is taken" in caplog.text
    free = free_port()
    assert serve(app.backend.store, free) is True
    with urllib.request.urlopen(f"http://127.0.0.1:{free}/metrics", timeout=5) as reply:
        assert value(reply.read().decode(), "perkey_up") == 1


def test_sweep_task_publishes_to_a_textfile(make_app: Any, r: redis.Redis, tmp_path: Path) -> None:
    target = tmp_path / "node.prom"
    app = make_app(perkey_prometheus_textfile=str(target))
    app.conf.result_expires = None
    app.backend.store_result("t1", 1, states.SUCCESS)
    app.backend.cleanup()
    assert value(target.read_text(), "perkey_sweep_ttl_set_total") == 1


def test_a_snapshot_missing_figures_or_unreadable_still_renders(app: Any, r: redis.Redis) -> None:
    key = app.backend.layout.metrics
    r.hset(key, mapping={"stats": '{"by_kind": {"result": 4}}', "stats_ms": 1000, "sweeps": 3})
    shown = render(app.backend.store).decode()
    assert value(shown, "perkey_keys", kind="result") == 4
    assert value(shown, "perkey_legacy_keys", kind="task") == 0
    assert value(shown, "perkey_sweeps_total") == 3
    r.hset(key, "stats", "{not json")
    shown = render(app.backend.store).decode()
    assert value(shown, "perkey_up") == 1
    assert value(shown, "perkey_keys", kind="result") is None
