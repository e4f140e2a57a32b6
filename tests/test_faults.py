"""Faults the core must ride out: a server restart during a wait, unreadable keys."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
import redis
from celery import states
from celery.exceptions import TimeoutError

from celery_perkey_backend import BackendUnavailableError, CorruptResultError, StoreCommandError
from celery_perkey_backend.testing import EmbeddedServer

from .conftest import wait_for_blocked_clients, wait_until


def test_wait_survives_a_server_restart(make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    first = EmbeddedServer().start()
    app = make_app(backend=f"perkey://127.0.0.1:{first.port}/0", redis_socket_timeout=2)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(app.AsyncResult("t1").get(timeout=20)))
    with caplog.at_level(logging.WARNING):
        waiter.start()
        wait_for_blocked_clients(redis.Redis(port=first.port), 1)
        first.stop()
        wait_until(lambda: _noticed(caplog), "the waiter noticed the lost connection")
        second = EmbeddedServer(port=first.port).start()
        try:
            app.backend.store_result("t1", "after restart", states.SUCCESS)
            waiter.join(20)
        finally:
            second.stop()
    assert got == ["after restart"]
    lost = [rec for rec in caplog.records if "connection lost" in rec.getMessage()]
    assert len(lost) == 1


def _noticed(caplog: pytest.LogCaptureFixture) -> bool:
    return any("connection lost" in rec.getMessage() for rec in caplog.records)


def test_wait_gives_up_after_retries_with_a_clear_error(make_app: Any) -> None:
    srv = EmbeddedServer().start()
    app = make_app(
        backend=f"perkey://127.0.0.1:{srv.port}/0",
        result_backend_transport_options={"retry_policy": {"max_retries": 2}},
    )
    app.backend.store_result("warm", 1, states.SUCCESS)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            app.AsyncResult("t1").get(timeout=30)
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_for_blocked_clients(redis.Redis(port=srv.port), 1)
    srv.stop()
    waiter.join(30)
    assert len(errors) == 1
    assert isinstance(errors[0], BackendUnavailableError)
    assert f"127.0.0.1:{srv.port}" in str(errors[0])


def test_garbage_progress_entry(app: Any, r: redis.Redis) -> None:
    r.set(app.backend.layout.state("t1"), b"P1|\x00garbage")
    with pytest.raises(CorruptResultError, match="t1"):
        app.AsyncResult("t1").state  # noqa: B018


def test_garbage_legacy_key(app: Any, r: redis.Redis) -> None:
    r.set(app.backend.layout.legacy("t1"), b"\x00garbage")
    with pytest.raises(CorruptResultError) as info:
        app.AsyncResult("t1").get(timeout=1)
    assert info.value.key == "celery-task-meta-t1"


def test_meta_of_the_wrong_shape(app: Any, r: redis.Redis) -> None:
    r.rpush(app.backend.layout.result("t1"), b"S1|[1, 2, 3]")
    with pytest.raises(CorruptResultError, match="status"):
        app.AsyncResult("t1").get(timeout=1)


def test_wrong_type_in_a_group_join(app: Any, r: redis.Redis) -> None:
    app.backend.store_result("ok", 1, states.SUCCESS)
    r.hset(app.backend.layout.result("bad"), "x", "y")
    group = app.GroupResult("g", [app.AsyncResult("ok"), app.AsyncResult("bad")])
    with pytest.raises(StoreCommandError, match="bad"):
        group.get(timeout=1)


def test_wait_for_is_public_api(app: Any) -> None:
    app.backend.store_result("t1", 9, states.SUCCESS)
    assert app.backend.wait_for("t1", timeout=1)["result"] == 9
    with pytest.raises(TimeoutError):
        app.backend.wait_for("t2", timeout=0.1)
