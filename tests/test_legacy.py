"""Switching from redis://: results the built-in backend wrote stay readable."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from celery import states

from celery_perkey_backend import CorruptResultError, StoreCommandError


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
