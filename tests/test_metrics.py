"""Key metrics and their Prometheus export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
from celery import states
from prometheus_client import CollectorRegistry

from celery_perkey_backend.prometheus import export_prometheus
from celery_perkey_backend.stats import collect_stats
from celery_perkey_backend.sweep import sweep


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


def test_prometheus_gauges_counters_and_textfile(
    make_app: Any, r: redis.Redis, tmp_path: Path
) -> None:
    app = _fill(make_app, r)
    registry = CollectorRegistry()
    summary = sweep(app.backend)
    export_prometheus(app.backend.stats(), summary, registry=registry)
    export_prometheus(None, summary, registry=registry, textfile=str(tmp_path / "perkey.prom"))
    value = registry.get_sample_value
    assert value("perkey_keys", {"kind": "result"}) == 36
    # The sweep gave every key of ours a TTL; the one of the wrong type is not counted.
    assert value("perkey_keys_without_ttl") == 0
    assert value("perkey_sweeps_total") == 2
    assert value("perkey_sweep_ttl_set_total") == 10  # 5 keys, exported twice
    assert value("perkey_swept_keys_total", {"class": "no_ttl"}) == 10
    text = (tmp_path / "perkey.prom").read_text()
    assert "perkey_sweeps_total 2.0" in text


def test_sweep_task_publishes_to_a_textfile(make_app: Any, r: redis.Redis, tmp_path: Path) -> None:
    target = tmp_path / "node.prom"
    app = make_app(perkey_prometheus_textfile=str(target))
    app.conf.result_expires = None
    app.backend.store_result("t1", 1, states.SUCCESS)
    app.backend.cleanup()
    assert "perkey_sweep_ttl_set_total" in target.read_text()
