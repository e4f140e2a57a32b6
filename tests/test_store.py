"""Storage: one list per task holding one ready element, written atomically with its TTL."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
import redis
from celery import states
from celery.exceptions import BackendStoreError

from celery_perkey_backend import CorruptResultError, keys

from .conftest import command_calls


def test_ready_result_is_one_list_element_with_ttl(app: Any, r: redis.Redis) -> None:
    backend = app.backend
    backend.store_result("t1", {"a": 1}, states.SUCCESS)
    rkey = backend.layout.result("t1")
    assert r.type(rkey) == b"list"
    assert r.llen(rkey) == 1
    ttl = r.pttl(rkey)
    assert 86_000_000 < ttl <= 86_400_000  # result_expires defaults to one day
    record = keys.parse_ready(r.lindex(rkey, 0))
    assert record.letter == "S"
    assert backend.decode(record.payload)["result"] == {"a": 1}
    # No intermediate state is kept for a task that is ready.
    assert not r.exists(backend.layout.state("t1"))


def test_write_time_header_is_server_time(app: Any, r: redis.Redis) -> None:
    app.backend.store_result("t1", 1, states.SUCCESS)
    record = keys.parse_ready(r.lindex(app.backend.layout.result("t1"), 0))
    seconds, micros = r.time()
    now_ms = seconds * 1000 + micros // 1000
    assert 0 <= now_ms - record.written_ms < 5000


def test_success_is_final(app: Any, r: redis.Redis) -> None:
    backend = app.backend
    backend.store_result("t1", "first", states.SUCCESS)
    backend.store_result("t1", "late duplicate", states.FAILURE)
    backend.store_result("t1", None, states.STARTED)
    meta = backend.get_task_meta("t1", cache=False)
    assert meta["status"] == states.SUCCESS
    assert meta["result"] == "first"
    assert r.llen(backend.layout.result("t1")) == 1


def test_failure_can_be_replaced(app: Any) -> None:
    backend = app.backend
    backend.store_result("t1", KeyError("x"), states.FAILURE)
    backend.store_result("t1", None, states.RETRY)
    assert backend.get_task_meta("t1")["status"] == states.RETRY
    backend.store_result("t1", 42, states.SUCCESS)
    meta = backend.get_task_meta("t1")
    assert (meta["status"], meta["result"]) == (states.SUCCESS, 42)


def test_intermediate_states_stay_out_of_the_list(app: Any, r: redis.Redis) -> None:
    backend = app.backend
    backend.store_result("t1", None, states.STARTED)
    backend.store_result("t1", {"step": 3}, "PROGRESS")
    assert not r.exists(backend.layout.result("t1"))
    # The latest intermediate state only, in one small string with a TTL.
    assert r.type(backend.layout.state("t1")) == b"string"
    assert r.pttl(backend.layout.state("t1")) > 0
    record = keys.parse_ready(r.get(backend.layout.state("t1")))
    assert record.letter == "P"
    meta = backend.get_task_meta("t1")
    assert meta["status"] == "PROGRESS"
    assert meta["result"] == {"step": 3}
    backend.store_result("t1", 3, states.SUCCESS)
    assert not r.exists(backend.layout.state("t1"))


def test_failure_expires_applies_to_failures_only(make_app: Any, r: redis.Redis) -> None:
    app = make_app(result_expires=100, result_failure_expires=datetime.timedelta(seconds=5))
    app.backend.store_result("ok", 1, states.SUCCESS)
    app.backend.store_result("bad", ValueError("x"), states.FAILURE)
    assert 99_000 < r.pttl(app.backend.layout.result("ok")) <= 100_000
    assert 4_000 < r.pttl(app.backend.layout.result("bad")) <= 5_000


@pytest.mark.parametrize("expires", [None, 0])
def test_no_expiry_means_no_ttl(make_app: Any, r: redis.Redis, expires: Any) -> None:
    app = make_app()
    app.conf.result_expires = expires
    app.backend.store_result("t1", 1, states.SUCCESS)
    assert r.pttl(app.backend.layout.result("t1")) == -1


def test_store_is_one_round_trip(app: Any, r: redis.Redis) -> None:
    backend = app.backend
    backend.store_result("warm", 1, states.SUCCESS)  # loads the script
    before = command_calls(r)
    backend.store_result("t1", 1, states.SUCCESS)
    diff = command_calls(r) - before
    assert diff["evalsha"] == 1
    # Everything else ran inside the script (commandstats counts those too): no GET
    # before the write and no MULTI around it.
    inside = {"lindex", "del", "rpush", "pexpire", "smembers", "time", "info"}
    assert set(diff) - inside == {"evalsha"}


@pytest.mark.parametrize("serializer", ["json", "pickle", "msgpack", "yaml"])
def test_serializers(make_app: Any, serializer: str) -> None:
    app = make_app(
        result_serializer=serializer,
        result_accept_content=[serializer],
        accept_content=[serializer],
    )
    app.backend.store_result("t1", {"n": [1, 2]}, states.SUCCESS)
    assert app.backend.get_task_meta("t1")["result"] == {"n": [1, 2]}


def test_compression_round_trip(make_app: Any, r: redis.Redis) -> None:
    app = make_app(result_compression="zlib")
    value = "x" * 10_000
    app.backend.store_result("t1", value, states.SUCCESS)
    raw = r.lindex(app.backend.layout.result("t1"), 0)
    assert len(raw) < 1000
    assert app.backend.get_task_meta("t1")["result"] == value


def test_result_too_large_is_refused(make_app: Any, r: redis.Redis) -> None:
    app = make_app(perkey_max_result_bytes=1000)
    with pytest.raises(BackendStoreError, match="t-big"):
        app.backend.store_result("t-big", "x" * 2000, states.SUCCESS)
    assert not r.exists(app.backend.layout.result("t-big"))


def test_global_keyprefix_and_own_prefix(make_app: Any, r: redis.Redis) -> None:
    app = make_app(
        result_backend_transport_options={"global_keyprefix": "tenant1"},
        perkey_key_prefix="res:",
    )
    app.backend.store_result("t1", 1, states.SUCCESS)
    assert r.keys("*") == [b"tenant1_res:r:{t1}"]


def test_forget_removes_everything_but_the_registrations(app: Any, r: redis.Redis) -> None:
    backend = app.backend
    backend.store_result("running", None, "PROGRESS")
    watchers = backend.layout.watchers("running")
    r.sadd(watchers, "an inbox")
    r.pexpire(watchers, 60_000)
    backend.store_result("done", 1, states.SUCCESS)
    assert r.dbsize() == 3
    app.AsyncResult("running").forget()
    app.AsyncResult("done").forget()
    # The waits of other processes stay registered; their registration expires.
    assert r.keys("*") == [watchers.encode()]
    assert 0 < r.pttl(watchers) <= 60_000
    assert app.AsyncResult("done").state == states.PENDING


def test_content_outside_result_accept_content_is_refused(make_app: Any) -> None:
    writer = make_app(result_serializer="pickle", result_accept_content=["pickle"])
    writer.backend.store_result("t1", {"pickled": True}, states.SUCCESS)
    # A reader that may not unpickle refuses before loading anything.
    guarded = make_app(result_serializer="pickle", result_accept_content=["json"])
    with pytest.raises(CorruptResultError, match="ContentDisallowed") as info:
        guarded.AsyncResult("t1").get(timeout=1)
    assert info.value.task_id == "t1"
    # A JSON reader never runs the pickle loader at all.
    json_reader = make_app(result_accept_content=["json"])
    with pytest.raises(CorruptResultError, match="DecodeError"):
        json_reader.AsyncResult("t1").get(timeout=1)
