"""Scale-out: the whole backend on a real local Redis Cluster and under Sentinel."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import chord, group, states
from redis.crc import key_slot

from celery_perkey_backend import BackendUnavailableError
from celery_perkey_backend.testing import LocalCluster, LocalSentinel

from .conftest import run_cli, running_worker, wait_for_blocked_clients, wait_until


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster() as local:
        yield local


@pytest.fixture
def capp(make_app: Any, cluster: LocalCluster) -> Iterator[Any]:
    app = make_app(backend=cluster.url, broker_url="memory://")
    yield app
    for port in cluster.primaries():
        cluster.client(port).flushall()


def _on_every_primary(cluster: LocalCluster, names: list[str]) -> set[int]:
    return {cluster.primary_for_key(name) for name in names}


def test_the_whole_backend_on_a_cluster(capp: Any, cluster: LocalCluster) -> None:
    backend = capp.backend
    assert isinstance(backend.client, redis.RedisCluster)
    ids = [f"t{i}" for i in range(30)]
    assert len(_on_every_primary(cluster, [backend.layout.result(t) for t in ids])) == 3
    for i, task_id in enumerate(ids):
        backend.store_result(task_id, i, states.SUCCESS)
    # A group join reads every stored result in per-node pipelines.
    joined = capp.GroupResult("g", [capp.AsyncResult(t) for t in ids]).get(timeout=5)
    assert joined == list(range(30))
    backend.store_result("p", {"step": 1}, "PROGRESS")
    assert capp.AsyncResult("p").info == {"step": 1}
    seen: list[str] = []
    threading.Timer(0.3, backend.store_result, ("p", "done", states.SUCCESS)).start()
    assert capp.AsyncResult("p").get(timeout=5, on_message=lambda m: seen.append(m["status"]))
    assert seen == ["PROGRESS", states.SUCCESS]
    with running_worker(capp):
        tasks = capp.tasks
        assert tasks["t.add"].delay(2, 2).get(timeout=10) == 4
        header = [tasks["t.add"].s(i, i) for i in range(6)]
        assert chord(header)(tasks["t.tsum"].s()).get(timeout=15) == 30
        saved = group(tasks["t.add"].s(1, i) for i in range(3))()
        assert saved.get(timeout=10) == [1, 2, 3]
        saved.save()
        assert capp.GroupResult.restore(saved.id).get(timeout=5) == [1, 2, 3]
        saved.delete()
    capp.AsyncResult("t0").forget()
    assert capp.AsyncResult("t0").state == states.PENDING


def test_read_once_on_a_cluster(make_app: Any, cluster: LocalCluster, capp: Any) -> None:
    once = make_app(backend=cluster.url, perkey_read_once=True)
    for i in range(6):
        once.backend.store_result(f"o{i}", i, states.SUCCESS)
    got = once.GroupResult("g", [once.AsyncResult(f"o{i}") for i in range(6)]).get(timeout=5)
    assert got == list(range(6))
    assert sum(cluster.client(p).dbsize() for p in cluster.primaries()) == 0


def test_sweep_and_stats_walk_every_primary(
    make_app: Any, cluster: LocalCluster, capp: Any
) -> None:
    forever = make_app(backend=cluster.url)
    forever.conf.result_expires = None
    ids = [f"n{i}" for i in range(30)]
    for task_id in ids:
        forever.backend.store_result(task_id, 1, states.SUCCESS)
    assert forever.backend.stats().by_kind == {"result": 30}
    summary = forever.backend.run_sweep()
    assert summary.by_class["no_ttl"] == 30
    assert summary.ttl_set == 30
    client = forever.backend.client
    assert all(client.ttl(forever.backend.layout.result(t)) > 0 for t in ids)


def test_stalled_chords_are_repaired_on_a_cluster(
    make_app: Any, cluster: LocalCluster, capp: Any
) -> None:
    """Header workers that died after storing their results: the sweep, walking every
    primary, runs each chord's body (the chords' keys spread over the primaries)."""
    from celery.app.task import Context

    app = make_app(backend=cluster.url, broker_url="memory://", perkey_chord_claim_ttl="200ms")
    backend = app.backend
    bodies = {}
    for n in range(6):
        gid = f"g-stalled-{n}"
        body = app.tasks["t.tsum"].s()
        body.freeze()
        bodies[gid] = body
        backend.apply_chord((gid, [app.AsyncResult(f"{gid}-{i}") for i in range(3)]), body)
        backend.set_chord_size(gid, 3)
        for i in range(3):
            request = Context(id=f"{gid}-{i}", group=gid, group_index=i, chord=body)
            backend.store_result(f"{gid}-{i}", n + i, states.SUCCESS, request=request)
    claims = [backend.layout.chord_keys(gid).claim for gid in bodies]
    assert len(_on_every_primary(cluster, claims)) > 1
    repaired = 0
    with running_worker(app):
        deadline = time.monotonic() + 30
        while repaired < len(bodies):
            assert time.monotonic() < deadline, f"{repaired} of {len(bodies)} repaired"
            repaired += backend.run_sweep(chords_only=True).chords_repaired
            time.sleep(0.05)
        for n, body in enumerate(bodies.values()):
            assert app.AsyncResult(body.id).get(timeout=10) == 3 * n + 3
    assert backend.stats().chords_stalled == 0


@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_multiplexed_waits_on_a_cluster(make_app: Any, cluster: LocalCluster, mode: str) -> None:
    """Registrations go to each task's node; notifications cross to the inbox's node in
    a second round trip of the storing client; the checks read per node."""
    import asyncio

    from celery_perkey_backend import aio

    app = make_app(backend=cluster.url, broker_url="memory://", perkey_multiplex=True)
    ids = [f"{mode}-{i}" for i in range(12)]
    app.backend.store_result(ids[0], "before", states.SUCCESS)

    def wait(task_id: str) -> Any:
        result = app.AsyncResult(task_id)
        if mode == "sync":
            return result.get(timeout=30)
        return asyncio.run(aio.wait(result, timeout=30))

    outcome: dict[str, Any] = {}
    threads = [threading.Thread(target=lambda t=t: outcome.__setitem__(t, wait(t))) for t in ids]
    for thread in threads:
        thread.start()
    layout = app.backend.layout
    for task_id in ids[1:]:
        node = cluster.client(cluster.primary_for_key(layout.watchers(task_id)))
        wait_until(lambda t=task_id, n=node: n.exists(layout.watchers(t)), f"{task_id} waits")
    for task_id in ids[1:]:
        app.backend.store_result(task_id, f"after {task_id}", states.SUCCESS)
    for thread in threads:
        thread.join(30)
    assert outcome == {ids[0]: "before", **{t: f"after {t}" for t in ids[1:]}}


def test_a_wait_survives_a_slot_migration(capp: Any, cluster: LocalCluster) -> None:
    key = capp.backend.layout.result("moving")
    slot = key_slot(key.encode())
    source = cluster.primary_for_slot(slot)
    target = next(p for p in cluster.primaries() if p != source)
    outcome: list[Any] = []
    waiter = threading.Thread(
        target=lambda: outcome.append(capp.AsyncResult("moving").get(timeout=30))
    )
    waiter.start()
    wait_for_blocked_clients(cluster.client(source), 1)
    cluster.migrate_slot(slot, target)
    capp.backend.store_result("moving", "found after the move", states.SUCCESS)
    waiter.join(30)
    assert outcome == ["found after the move"]
    assert cluster.primary_for_key(key) == target


def test_failover_during_a_wait_and_a_burst_of_stores(
    make_app: Any, cluster: LocalCluster, capp: Any
) -> None:
    app = make_app(backend=cluster.url, perkey_min_replicas=1, redis_socket_timeout=2)
    key = app.backend.layout.result("awaited")
    outcome: list[Any] = []
    waiter = threading.Thread(
        target=lambda: outcome.append(app.AsyncResult("awaited").get(timeout=60))
    )
    waiter.start()
    acknowledged: list[str] = []
    unexpected: list[BaseException] = []
    stop = threading.Event()

    def burst() -> None:
        n = 0
        while not stop.is_set() and n < 2000:
            task_id = f"b{n}"
            try:
                app.backend.store_result(task_id, n, states.SUCCESS)
                acknowledged.append(task_id)
            except BackendUnavailableError:
                pass  # not acknowledged: allowed to be lost
            except BaseException as exc:  # e.g. a WAIT unblocked by the failover
                unexpected.append(exc)
                return
            n += 1

    storer = threading.Thread(target=burst)
    storer.start()
    primary = cluster.primary_for_key(key)
    wait_for_blocked_clients(cluster.client(primary), 1)
    wait_until(lambda: len(acknowledged) >= 20, "the burst is under way")
    cluster.failover(primary)
    # The burst goes on across the failover until stores land on the new primary.
    after = len(acknowledged)
    wait_until(
        lambda: len(acknowledged) >= after + 20 or not storer.is_alive(),
        "stores are acknowledged after the failover",
        60,
    )
    stop.set()
    storer.join(60)
    assert unexpected == []
    app.backend.store_result("awaited", "after the failover", states.SUCCESS)
    waiter.join(60)
    assert outcome == ["after the failover"]
    assert acknowledged
    found = app.GroupResult("b", [app.AsyncResult(t) for t in acknowledged]).get(timeout=30)
    assert len(found) == len(acknowledged)


def test_sentinel_failover(make_app: Any) -> None:
    with LocalSentinel() as sentinels:
        url = "perkey+" + sentinels.sentinel_url
        app = make_app(
            backend=url,
            result_backend_transport_options={"master_name": sentinels.master_name},
            perkey_min_replicas=1,
            redis_socket_timeout=2,
        )
        app.backend.store_result("before", "kept", states.SUCCESS)
        outcome: list[Any] = []
        waiter = threading.Thread(
            target=lambda: outcome.append(app.AsyncResult("during").get(timeout=60))
        )
        waiter.start()
        old = sentinels.master_port()
        wait_for_blocked_clients(sentinels.client(old), 1)
        new = sentinels.failover()
        assert new != old
        app.backend.store_result("during", "after the failover", states.SUCCESS)
        waiter.join(60)
        assert outcome == ["after the failover"]
        assert app.AsyncResult("before").get(timeout=5) == "kept"
        # The master's client counts are labelled by its name: its address moves.
        from celery_perkey_backend.prometheus import render

        shown = render(app.backend.store).decode()
        assert f'perkey_server_maxclients{{server="{sentinels.master_name}"}}' in shown


def test_min_replicas_refuses_an_unreplicated_store(make_app: Any) -> None:
    from celery_perkey_backend.testing import EmbeddedServer

    with EmbeddedServer() as lonely:
        app = make_app(
            backend=f"perkey://127.0.0.1:{lonely.port}/0",
            perkey_min_replicas=1,
            perkey_min_replicas_timeout=0.2,
            result_backend_transport_options={"retry_policy": {"max_retries": 0}},
        )
        with pytest.raises(BackendUnavailableError, match="0 of 1 replicas"):
            app.backend.store_result("t1", 1, states.SUCCESS)


def test_a_braced_prefix_is_refused_on_a_cluster(make_app: Any, cluster: LocalCluster) -> None:
    from celery_perkey_backend import ConfigurationError

    app = make_app(backend=cluster.url, perkey_key_prefix="{app}:")
    with pytest.raises(ConfigurationError, match="brace"):
        _ = app.backend


def test_keys_of_redis_are_read_and_counted_on_a_cluster(capp: Any, cluster: LocalCluster) -> None:
    """The fallback keys live in other slots than ours: reads and counts span nodes."""
    backend = capp.backend
    ids = [f"old{i}" for i in range(12)]
    for i, task_id in enumerate(ids):
        meta = {"status": states.SUCCESS, "result": i, "traceback": None, "children": []}
        backend.client.set(f"celery-task-meta-{task_id}", backend.encode(meta), ex=600)
    saved = capp.GroupResult("old-group", [capp.AsyncResult(t) for t in ids])
    backend.client.set(
        "celery-taskset-meta-old-group", backend.encode({"result": saved.as_tuple()})
    )
    assert len(_on_every_primary(cluster, [f"celery-task-meta-{t}" for t in ids])) == 3
    restored = capp.GroupResult.restore("old-group")
    assert restored.get(timeout=5) == list(range(12))
    stats = backend.stats()
    assert stats.legacy_keys == {"task": 12, "group": 1, "chord": 0}
    assert stats.legacy_without_ttl == {"task": 0, "group": 1, "chord": 0}
    report = json.loads(run_cli(capp, "migrate", "--expire-legacy", "1h", "--json").stdout)
    assert (report["results"], report["groups"], report["ttl_given"]) == (12, 1, 1)
    assert report["results_not_ready"] == 0
    restored.delete()
    assert not backend.client.exists("celery-taskset-meta-old-group")
    # Prometheus shows each primary's clients, and the counts kept in the metrics hash.
    from celery_perkey_backend.prometheus import render

    backend.store.record_metrics([("+", "sweeps", 2)])
    shown = render(backend.store).decode()
    assert shown.count("perkey_server_maxclients{") == 3
    assert "perkey_sweeps_total 2.0" in shown


def test_a_cluster_with_no_node_left_is_an_outage(make_app: Any) -> None:
    """With every node gone, redis-py says "Redis Cluster cannot be connected" with an
    exception outside its RedisError family: it is an outage like any other, and the
    multiplexer's last clean-up does not die of it."""
    with LocalCluster(replicas_per_primary=0) as lonely:
        app = make_app(
            backend=lonely.url,
            broker_url="memory://",
            result_backend_transport_options={"retry_policy": {"max_retries": 0}},
        )
        app.backend.store_result("t1", 1, states.SUCCESS)
        assert app.AsyncResult("t1").get(timeout=5) == 1
    with pytest.raises(BackendUnavailableError, match="unavailable"):
        app.backend.store_result("t2", 2, states.SUCCESS)
    with pytest.raises(BackendUnavailableError, match="unavailable"):
        app.backend.store.delete("anything")
