"""Faults injected for real: restarts, cut / delayed / blackholed links, lost replies."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import states
from celery.exceptions import TimeoutError

from celery_perkey_backend import BackendUnavailableError
from celery_perkey_backend.testing import EmbeddedServer

from .conftest import wait_for_blocked_clients, wait_until
from .netproxy import Proxy


def _waiter(app: Any, task_id: str, timeout: float) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        started = time.monotonic()
        try:
            outcome.append(app.AsyncResult(task_id).get(timeout=timeout))
        except BaseException as exc:
            outcome.append(exc)
        outcome.append(time.monotonic() - started)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("aof", [False, True], ids=["no-persistence", "aof"])
def test_restart_during_a_wait(
    make_app: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, aof: bool
) -> None:
    args = ["--appendonly", "yes"] if aof else []
    first = EmbeddedServer(args=args, directory=tmp_path).start()
    app = make_app(backend=f"perkey://127.0.0.1:{first.port}/0", redis_socket_timeout=2)
    app.backend.store_result("before", "kept", states.SUCCESS)
    with caplog.at_level(logging.WARNING):
        thread, outcome = _waiter(app, "after", timeout=20)
        wait_for_blocked_clients(redis.Redis(port=first.port), 1)
        first.stop()
        wait_until(
            lambda: any("connection lost" in rec.getMessage() for rec in caplog.records),
            "the waiter noticed the restart",
        )
        second = EmbeddedServer(args=args, port=first.port, directory=tmp_path).start()
        try:
            app.backend.store_result("after", "stored after the restart", states.SUCCESS)
            thread.join(20)
            survived = app.AsyncResult("before").state
        finally:
            second.stop()
    assert outcome[0] == "stored after the restart"
    # Only an append-only file keeps what was stored before the restart.
    assert survived == (states.SUCCESS if aof else states.PENDING)
    assert len([rec for rec in caplog.records if rec.levelno >= logging.WARNING]) <= 1


def test_deadline_holds_while_the_server_is_down(make_app: Any) -> None:
    server = EmbeddedServer().start()
    app = make_app(backend=f"perkey://127.0.0.1:{server.port}/0")
    app.backend.store_result("warm", 1, states.SUCCESS)
    thread, outcome = _waiter(app, "t1", timeout=1.5)
    wait_for_blocked_clients(redis.Redis(port=server.port), 1)
    server.stop()
    thread.join(10)
    assert isinstance(outcome[0], TimeoutError)
    assert outcome[1] < 1.5 + 3


@pytest.fixture
def proxied(make_app: Any, server: EmbeddedServer, r: redis.Redis) -> Iterator[tuple[Proxy, Any]]:
    proxy = Proxy(server.port)
    app = make_app(
        backend=f"perkey://127.0.0.1:{proxy.port}/0",
        redis_socket_timeout=1,
        redis_socket_connect_timeout=1,
        result_backend_transport_options={
            "retry_policy": {"max_retries": 10, "interval_start": 0.1, "interval_max": 0.2}
        },
    )
    yield proxy, app
    proxy.close()


def test_a_wait_resumes_after_the_link_is_cut(proxied: tuple[Proxy, Any], r: redis.Redis) -> None:
    proxy, app = proxied
    thread, outcome = _waiter(app, "t1", timeout=15)
    wait_for_blocked_clients(r, 1)
    proxy.cut()
    app.backend.store_result("t1", "after the cut", states.SUCCESS)
    thread.join(15)
    assert outcome[0] == "after the cut"


def test_a_blackholed_link_cannot_hold_a_wait_past_its_deadline(
    proxied: tuple[Proxy, Any],
) -> None:
    proxy, app = proxied
    app.backend.store_result("warm", 1, states.SUCCESS)
    proxy.blackholed = True
    thread, outcome = _waiter(app, "t1", timeout=1.0)
    thread.join(15)
    assert isinstance(outcome[0], TimeoutError)
    assert outcome[1] < 1.0 + 3
    proxy.blackholed = False
    proxy.cut()
    app.backend.store_result("t1", "healed", states.SUCCESS)
    assert app.AsyncResult("t1").get(timeout=5) == "healed"


def test_a_slow_link_still_works(proxied: tuple[Proxy, Any]) -> None:
    proxy, app = proxied
    proxy.delay = 0.05
    _store_later = threading.Timer(0.3, app.backend.store_result, ("t1", "slow", states.SUCCESS))
    _store_later.start()
    assert app.AsyncResult("t1").get(timeout=10) == "slow"


def test_a_lost_reply_is_retried_and_lands_once(proxied: tuple[Proxy, Any], r: redis.Redis) -> None:
    proxy, app = proxied
    app.backend.store_result("warm", 1, states.SUCCESS)
    proxy.drop_replies = 1  # the store runs on the server, its answer never arrives
    app.backend.store_result("t1", {"v": 1}, states.SUCCESS)
    key = app.backend.layout.result("t1")
    assert r.llen(key) == 1
    assert app.AsyncResult("t1").get(timeout=5) == {"v": 1}


def test_duplicate_deliveries_are_harmless(app: Any, r: redis.Redis) -> None:
    for _ in range(3):
        app.backend.store_result("t1", "first", states.SUCCESS)
        app.backend.store_result("t1", "a redelivered run", states.SUCCESS)
        app.backend.store_result("t2", ValueError("x"), states.FAILURE)
    assert r.llen(app.backend.layout.result("t1")) == 1
    assert r.llen(app.backend.layout.result("t2")) == 1
    assert app.AsyncResult("t1").get(timeout=1) == "first"


def test_without_retries_the_error_is_clear(make_app: Any) -> None:
    with EmbeddedServer(args=["--requirepass", "pw-secret"]) as server:
        proxy = Proxy(server.port)
        app = make_app(
            backend=f"perkey://:pw-secret@127.0.0.1:{proxy.port}/0",
            redis_socket_timeout=0.5,
            result_backend_transport_options={"retry_policy": {"max_retries": 0}},
        )
        app.backend.store_result("t0", 0, states.SUCCESS)
        proxy.blackholed = True
        try:
            with pytest.raises(BackendUnavailableError) as info:
                app.backend.store_result("t1", 1, states.SUCCESS)
        finally:
            proxy.close()
    message = str(info.value)
    assert "store result of task 't1'" in message
    assert f"127.0.0.1:{proxy.port}" in message
    assert "pw-secret" not in message
