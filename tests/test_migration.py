"""The switch from `redis://` to `perkey://`, step by step, with workers of both kinds.

The README's checklist ("Switching from redis://") is what these tests run: clients
first, then workers, then `celery perkey migrate --check` until the fallback can go; and
the rollback, in the order that works and in the one that does not.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import chord, group, states
from celery.exceptions import TimeoutError

from .conftest import run_cli, running_worker, wait_until
from .processes import celery_worker, stop


@pytest.fixture(autouse=True)
def _no_subscription_left(server: Any) -> Iterator[None]:
    """redis:// clients subscribe while they wait, and keep the channel of a task that
    never got ready: the tests cancel those, and no later test (which may count the
    server's channels) sees one."""
    yield
    gc.collect()
    plain = redis.Redis(port=server.port)
    deadline = time.monotonic() + 10
    while plain.pubsub_channels():
        assert time.monotonic() < deadline, "a redis:// subscription outlived its test"
        time.sleep(0.05)
    plain.close()


def _never_ready(result: Any) -> None:
    """A redis:// client gives up on a result: drop its subscription."""
    result.backend.result_consumer.cancel_for(result.id)


def _redis_app(make_app: Any, server: Any, **conf: Any) -> Any:
    """A client or worker still on Celery's redis:// backend, on the same server."""
    return make_app(backend=f"redis://127.0.0.1:{server.port}/0", **conf)


@pytest.fixture
def old_app(make_app: Any, server: Any) -> Any:
    return _redis_app(make_app, server)


def test_workers_first_leaves_redis_clients_waiting(old_app: Any, app: Any, r: redis.Redis) -> None:
    """Why clients switch first: a perkey worker's result is where redis:// never looks."""
    with running_worker(app):
        result = old_app.signature("t.add", args=(1, 2)).delay()
        wait_until(lambda: r.exists(app.backend.layout.result(result.id)), "the perkey result", 30)
        with pytest.raises(TimeoutError):
            result.get(timeout=1)
        _never_ready(result)
        assert result.state == states.PENDING
        # The result is there, for a client that has switched.
        assert app.AsyncResult(result.id).get(timeout=1) == 3


def test_clients_first_read_what_old_workers_write(old_app: Any, make_app: Any) -> None:
    app = make_app(redis_socket_timeout=1)  # blocks of 0.75 s: the fallback is read sooner
    with running_worker(old_app):
        assert app.signature("t.add", args=(1, 2)).delay().get(timeout=30) == 3
        job = group(app.signature("t.add", args=(i, i)) for i in range(5)).apply_async()
        assert job.get(timeout=30) == [0, 2, 4, 6, 8]
        seen: list[str] = []
        done = app.signature("t.progress", args=(2, 0.01)).delay()
        assert done.get(timeout=30, on_message=lambda m: seen.append(m["status"])) == "finished"
        assert seen[-1] == states.SUCCESS


def test_a_chord_split_across_backends_never_completes(
    old_app: Any, app: Any, r: redis.Redis
) -> None:
    """A limitation of any switch: the client that starts a chord writes its size, the
    workers that run its header count it, each in its own backend's keys."""
    with running_worker(old_app):
        header = [app.signature("t.add", args=(i, i)) for i in range(3)]
        job = chord(header)(app.signature("t.tsum"))
        group_id = job.parent.id
        # The old worker counted all three parts in redis://'s keys, where no size is.
        wait_until(lambda: r.zcard(f"celery-taskset-meta-{group_id}.j") == 3, "three parts", 30)
        assert r.exists(app.backend.layout.chord(group_id, "s"))
        assert not r.exists(f"celery-taskset-meta-{group_id}.s")
        assert job.parent.get(timeout=5) == [0, 2, 4]
        with pytest.raises(TimeoutError):
            job.get(timeout=1)
        assert job.state == states.PENDING


def test_rollback_workers_first_then_clients(old_app: Any, make_app: Any, r: redis.Redis) -> None:
    app = make_app(redis_socket_timeout=1)
    with running_worker(app):
        before = app.signature("t.add", args=(1, 1)).delay()
        assert before.get(timeout=10) == 2
    # Rolling back, workers first: switched clients still read what redis:// workers
    # write, through the fallback.
    with running_worker(old_app):
        during = app.signature("t.add", args=(3, 3)).delay()
        assert during.get(timeout=30) == 6
        # Then the clients.
        after = old_app.signature("t.add", args=(4, 4)).delay()
        assert after.get(timeout=10) == 8
        assert old_app.AsyncResult(during.id).get(timeout=5) == 6
        # What perkey workers stored stays in perkey keys: out of redis://'s reach.
        assert old_app.AsyncResult(before.id).state == states.PENDING
        lost = old_app.AsyncResult(before.id)
        with pytest.raises(TimeoutError):
            lost.get(timeout=1)
        _never_ready(lost)
        assert app.AsyncResult(before.id).get(timeout=1) == 2


def test_the_checklist_with_real_workers_loses_no_result(
    server: Any, r: redis.Redis, make_app: Any
) -> None:
    legacy = f"redis://127.0.0.1:{server.port}/0"
    ttl = 12  # the legacy results' TTL: the check turns green once they have expired
    old_env = {"PERKEY_TEST_BACKEND": legacy, "PERKEY_TEST_RESULT_EXPIRES": str(ttl)}
    prefork = ("--pool=prefork", "--concurrency=2")
    expected: dict[str, Any] = {}
    old_client = _redis_app(make_app, server, result_expires=ttl)
    old_worker = celery_worker(server, old_env, *prefork)
    new_worker = None
    try:
        # Before: clients and workers on redis://; results stored, a group saved.
        for i in range(10):
            expected[old_client.send_task("w.mul", args=(i, 3)).id] = i * 3
        saved = group(old_client.signature("w.mul", args=(i, 5)) for i in range(4))()
        assert saved.get(timeout=60) == [0, 5, 10, 15]
        saved.save()

        # 1. Clients switch (perkey_legacy_fallback is on by default).
        client = make_app(redis_socket_timeout=2)
        restored = client.GroupResult.restore(saved.id)
        assert restored is not None
        assert restored.get(timeout=60) == [0, 5, 10, 15]
        for i in range(10):
            expected[client.send_task("w.mul", args=(i, 7)).id] = i * 7
        slow = client.send_task("w.slow", args=(4, "in flight during the switch"))
        expected[slow.id] = "in flight during the switch"
        wait_until(lambda: slow.state == states.STARTED, "the old worker starts the slow task", 30)

        # 2. Workers switch: new ones start, old ones stop warm (running tasks finish).
        new_worker = celery_worker(server, {}, *prefork)
        for i in range(20):
            expected[client.send_task("w.mul", args=(i, 11)).id] = i * 11
        stop(old_worker)
        assert old_worker.returncode == 0
        for i in range(10):
            expected[client.send_task("w.mul", args=(i, 13)).id] = i * 13

        # Every result, whichever worker wrote it, reaches the switched client.
        got = {task_id: client.AsyncResult(task_id).get(timeout=60) for task_id in expected}
        assert got == expected
        assert r.get(f"celery-task-meta-{slow.id}") is not None  # the old worker's

        # 3. Until the keys redis:// wrote are gone, the switch is not done.
        stats = json.loads(run_cli(client, "stats", "--json").stdout)
        assert stats["legacy_keys"]["task"] > 0
        assert stats["legacy_keys"]["group"] == 1
        check = run_cli(client, "migrate", "--check")
        assert check.exit_code == 7, check.output
        wait_until(
            lambda: run_cli(client, "migrate", "--check").exit_code == 0,
            "the legacy keys to expire",
            timeout=ttl + 60,
        )

        # 4. The fallback goes; everything still works.
        final = make_app(perkey_legacy_fallback=False)
        assert final.send_task("w.mul", args=(6, 7)).get(timeout=60) == 42
        assert not r.keys("celery-task-meta-*")
    finally:
        stop(old_worker)
        if new_worker is not None:
            stop(new_worker)
