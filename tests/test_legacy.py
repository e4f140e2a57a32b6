"""Switching from redis://: results the built-in backend wrote stay readable."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import redis
from celery import states

from celery_perkey_backend import CorruptResultError, StoreCommandError

from .conftest import run_cli


@pytest.fixture
def old_app(make_app: Any, server: Any) -> Any:
    return make_app(backend=f"redis://127.0.0.1:{server.port}/0")


def test_get_and_state_of_results_written_by_redis_backend(old_app: Any, app: Any) -> None:
    old_app.backend.store_result("done", {"v": 1}, states.SUCCESS)
    old_app.backend.store_result("done2", {"v": 2}, states.SUCCESS)
    old_app.backend.store_result("broke", KeyError("k"), states.FAILURE)
    old_app.backend.store_result("running", {"p": 50}, "PROGRESS")
    assert app.AsyncResult("done").get(timeout=2) == {"v": 1}
    assert app.AsyncResult("done").state == states.SUCCESS
    with pytest.raises(KeyError):
        app.AsyncResult("broke").get(timeout=2)
    running = app.AsyncResult("running")
    assert running.state == "PROGRESS"
    assert running.info == {"p": 50}
    group = app.GroupResult("g", [app.AsyncResult("done"), app.AsyncResult("done2")])
    assert group.get(timeout=2) == [{"v": 1}, {"v": 2}]


def test_legacy_result_written_during_a_wait(old_app: Any, make_app: Any) -> None:
    app = make_app(redis_socket_timeout=0.5)

    def later() -> None:
        time.sleep(0.5)
        old_app.backend.store_result("t1", "old worker", states.SUCCESS)

    threading.Thread(target=later, daemon=True).start()
    assert app.AsyncResult("t1").get(timeout=10) == "old worker"


def test_forget_removes_the_legacy_key_too(old_app: Any, app: Any, r: redis.Redis) -> None:
    old_app.backend.store_result("t1", 1, states.SUCCESS)
    app.AsyncResult("t1").forget()
    assert r.dbsize() == 0


def test_fallback_can_be_switched_off(old_app: Any, make_app: Any) -> None:
    app = make_app(perkey_legacy_fallback=False)
    old_app.backend.store_result("t1", 1, states.SUCCESS)
    assert app.AsyncResult("t1").state == states.PENDING


def test_wrong_type_under_our_key_is_a_clear_error(app: Any, r: redis.Redis) -> None:
    key = app.backend.layout.result("t1")
    r.set(key, "not a list")
    for read in (
        lambda: app.AsyncResult("t1").state,
        lambda: app.AsyncResult("t1").get(timeout=1),
        lambda: app.backend.store_result("t1", 1, states.SUCCESS),
    ):
        with pytest.raises(StoreCommandError) as info:
            read()
        assert key in str(info.value)
        assert "WRONGTYPE" not in str(info.value)
        assert not isinstance(info.value, redis.RedisError)


def test_garbage_in_our_key_names_task_and_key(app: Any, r: redis.Redis) -> None:
    key = app.backend.layout.result("t1")
    r.rpush(key, b"\xff\x00 not a result")
    with pytest.raises(CorruptResultError) as info:
        app.AsyncResult("t1").get(timeout=1)
    assert info.value.task_id == "t1"
    assert info.value.key == key
    app.backend.store_result("t2", 2, states.SUCCESS)
    assert app.AsyncResult("t2").get(timeout=1) == 2


@pytest.mark.parametrize("global_prefix", [None, "app1"])
def test_a_group_saved_by_redis_is_restored(
    make_app: Any, server: Any, r: redis.Redis, global_prefix: str | None
) -> None:
    options = {"global_keyprefix": global_prefix} if global_prefix else {}
    old = make_app(
        backend=f"redis://127.0.0.1:{server.port}/0",
        result_backend_transport_options=options,
    )
    new = make_app(result_backend_transport_options=options)
    members = [new.AsyncResult(f"m{i}") for i in range(3)]
    for i, member in enumerate(members):
        old.backend.store_result(member.id, i * 10, states.SUCCESS)
    # What GroupResult.save() does under redis:// (no redis:// result objects: they
    # would try to unsubscribe when collected, after the server is gone).
    old.backend.save_group("saved-group", new.GroupResult("saved-group", members))
    legacy_key = f"{global_prefix}_celery-taskset-meta-saved-group" if global_prefix else None
    assert r.exists(legacy_key or "celery-taskset-meta-saved-group")
    restored = new.GroupResult.restore("saved-group")
    assert restored is not None
    assert [m.id for m in restored.results] == ["m0", "m1", "m2"]
    assert restored.get(timeout=5) == [0, 10, 20]
    # Without the fallback it is gone, as any legacy key is.
    without = make_app(perkey_legacy_fallback=False, result_backend_transport_options=options)
    assert without.GroupResult.restore("saved-group") is None
    restored.delete()
    assert not r.exists(legacy_key or "celery-taskset-meta-saved-group")
    assert new.GroupResult.restore("saved-group") is None


def test_a_group_of_ours_wins_over_a_legacy_one(old_app: Any, app: Any) -> None:
    app.backend.store_result("a", "ours", states.SUCCESS)
    old_app.backend.store_result("b", "theirs", states.SUCCESS)
    old_app.backend.save_group("g", app.GroupResult("g", [app.AsyncResult("b")]))
    app.GroupResult("g", [app.AsyncResult("a")]).save()
    assert app.GroupResult.restore("g").get(timeout=5) == ["ours"]


def test_stats_count_the_keys_redis_left(old_app: Any, make_app: Any, r: redis.Redis) -> None:
    old_app.conf.result_expires = 3600
    for i in range(3):
        old_app.backend.store_result(f"old{i}", i, states.SUCCESS)
    app = make_app()
    old_app.backend.save_group("g1", app.GroupResult("g1", [app.AsyncResult("old0")]))
    forever = make_app(backend=old_app.conf.result_backend, result_expires=None)
    forever.backend.store_result("forever", 1, states.SUCCESS)
    r.set("celery-taskset-meta-g1.j", "a chord's part")
    app.backend.store_result("new", 1, states.SUCCESS)
    stats = app.backend.stats()
    assert stats.legacy_keys == {"task": 4, "group": 1, "chord": 1}
    assert stats.legacy_without_ttl == {"task": 1, "group": 0, "chord": 1}
    assert stats.by_kind == {"result": 1}
    # The same figures from a sample of a large keyspace, scaled.
    sampled = app.backend.stats(sample_limit=5)
    assert (sampled.sampled, sampled.examined) == (True, 5)
    # 5 of the 7 keys, each standing for 7/5 of a key (rounded per kind).
    assert abs(sum(sampled.legacy_keys.values()) + sampled.our_keys - 7) <= 2


def test_migrate_check_says_when_the_switch_is_done(
    old_app: Any, make_app: Any, r: redis.Redis
) -> None:
    app = make_app()
    done = run_cli(app, "migrate", "--check")
    assert done.exit_code == 0, done.output
    assert "done:" in done.stdout
    forever = make_app(backend=old_app.conf.result_backend, result_expires=None)
    forever.backend.store_result("ready", 1, states.SUCCESS)
    forever.backend.store_result("running", {"step": 1}, "PROGRESS")
    forever.backend.save_group("g1", app.GroupResult("g1", [app.AsyncResult("ready")]))
    r.set("celery-task-meta-garbage", b"\x00not a meta", ex=60)
    r.set("celery-taskset-meta-g1.s", 3, ex=60)  # a chord redis:// counts: never read
    waiting = run_cli(app, "migrate", "--check")
    assert waiting.exit_code == 7, waiting.output
    assert "in flight: 4 key(s) of redis:// left" in waiting.stdout
    assert "1 task(s) still running" in waiting.stdout
    assert "3 never expire" in waiting.stdout
    report = json.loads(run_cli(app, "migrate", "--json").stdout)
    assert report["results"] == 3
    assert report["results_not_ready"] == 1
    assert report["results_unreadable"] == 1
    assert report["results_without_ttl"] == 2
    assert report["groups"] == 1
    assert report["groups_without_ttl"] == 1
    assert report["chord_keys"] == 1
    assert report["in_flight"] == 4
    assert 0 < report["last_expiry_s"] <= 60
    # The fallback being off does not hide them: they are what it would have read.
    off = run_cli(make_app(perkey_legacy_fallback=False), "migrate", "--check")
    assert off.exit_code == 7
    assert "read as PENDING" in off.stdout
    # TTL-less keys get one; keys with a TTL keep theirs. Then they expire, for real.
    given = json.loads(run_cli(app, "migrate", "--expire-legacy", "1s", "--json").stdout)
    assert given["ttl_given"] == 3
    assert r.ttl("celery-task-meta-garbage") > 1
    r.delete("celery-task-meta-garbage", "celery-taskset-meta-g1.s")
    deadline = time.monotonic() + 30
    while (last := run_cli(app, "migrate", "--check")).exit_code != 0:
        assert last.exit_code == 7, last.output
        assert time.monotonic() < deadline, last.stdout
        time.sleep(0.2)
    assert r.dbsize() == 0


def test_migrate_refuses_a_bad_duration_naming_the_option_once(app: Any, r: redis.Redis) -> None:
    done = run_cli(app, "migrate", "--expire-legacy", "banana")
    assert done.exit_code == 2
    assert "'banana' is not a duration" in done.stderr
    assert done.stderr.count("--expire-legacy") == 1


def test_on_message_sees_a_legacy_result_written_during_the_wait(
    old_app: Any, make_app: Any
) -> None:
    app = make_app(redis_socket_timeout=0.5)
    old_app.backend.store_result("t1", {"step": 1}, "PROGRESS")

    def later() -> None:
        time.sleep(0.5)
        old_app.backend.store_result("t1", "old worker", states.SUCCESS)

    threading.Thread(target=later, daemon=True).start()
    seen: list[Any] = []
    assert app.AsyncResult("t1").get(timeout=10, on_message=seen.append) == "old worker"
    assert [m["status"] for m in seen] == ["PROGRESS", states.SUCCESS]


def test_on_message_sees_a_legacy_key_that_appears_after_the_wait_began(
    old_app: Any, make_app: Any, r: redis.Redis
) -> None:
    """The task had not started when the wait began: no key of either kind yet."""
    app = make_app(redis_socket_timeout=0.5)
    seen: list[Any] = []
    waiter = threading.Thread(
        target=lambda: seen.append(app.AsyncResult("late").get(timeout=10, on_message=seen.append))
    )
    waiter.start()
    # The wait registers its process in the task's watchers: it has begun.
    deadline = time.monotonic() + 10
    while not r.exists(app.backend.layout.watchers("late")):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    old_app.backend.store_result("late", "old worker", states.SUCCESS)
    waiter.join(15)
    assert seen[-1] == "old worker"
    assert [m["status"] for m in seen[:-1]][-1] == states.SUCCESS
