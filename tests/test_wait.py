"""Waiting: blocking list commands, woken by one store, never pub/sub, never polling."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import redis
from celery import states
from celery.exceptions import TimeoutError

from celery_perkey_backend.testing import EmbeddedServer

from .conftest import READER, command_calls, running_worker, wait_for_blocked_clients


def _store_later(app: Any, task_id: str, value: Any, delay: float, state: str = "SUCCESS") -> None:
    def run() -> None:
        time.sleep(delay)
        app.backend.store_result(task_id, value, state)

    threading.Thread(target=run, daemon=True).start()


def test_get_blocks_until_the_store(app: Any) -> None:
    _store_later(app, "t1", {"x": 1}, 0.3)
    started = time.monotonic()
    assert app.AsyncResult("t1").get(timeout=10) == {"x": 1}
    assert time.monotonic() - started < 5


def test_intermediate_states_never_end_a_wait(app: Any, r: redis.Redis) -> None:
    def writer() -> None:
        for state in (states.STARTED, "PROGRESS", states.RETRY, "PROGRESS"):
            time.sleep(0.1)
            app.backend.store_result("t1", {"s": state}, state)

    before = command_calls(r)
    threading.Thread(target=writer, daemon=True).start()
    with pytest.raises(TimeoutError):
        app.AsyncResult("t1").get(timeout=1.0)
    waits = command_calls(r) - before
    # One blocking command covered the whole second: nothing woke it, no polling.
    assert waits["blmove"] == 1
    assert app.AsyncResult("t1").state == "PROGRESS"


def test_one_store_wakes_every_waiter(app: Any, backend_url: str, r: redis.Redis) -> None:
    results: list[Any] = []

    def wait() -> None:
        results.append(app.AsyncResult("t1").get(timeout=15))

    threads = [threading.Thread(target=wait) for _ in range(5)]
    for thread in threads:
        thread.start()
    other_process = subprocess.Popen(
        [sys.executable, "-c", READER, backend_url, "t1"], stdout=subprocess.PIPE, text=True
    )
    wait_for_blocked_clients(r, 6)
    app.backend.store_result("t1", "shared", states.SUCCESS)
    for thread in threads:
        thread.join(15)
    out, _ = other_process.communicate(timeout=15)
    assert results == ["shared"] * 5
    assert out.strip() == "'shared'"
    # Non-destructive: the result is still there for the next reader.
    assert app.AsyncResult("t1").get(timeout=1) == "shared"
    assert r.llen(app.backend.layout.result("t1")) == 1


def test_read_once_consumes(make_app: Any, r: redis.Redis) -> None:
    app = make_app(perkey_read_once=True)
    app.backend.store_result("t1", None, states.STARTED)
    app.backend.store_result("t1", 7, states.SUCCESS)
    assert app.AsyncResult("t1").get(timeout=5) == 7
    # The result and its progress history are both gone.
    assert r.dbsize() == 0
    assert app.AsyncResult("t1").state == states.PENDING
    # The same for a result that arrives while the consumer blocks, and with on_message.
    app.backend.store_result("t2", None, states.STARTED)
    threading.Timer(0.2, app.backend.store_result, ("t2", 8, states.SUCCESS)).start()
    assert app.AsyncResult("t2").get(timeout=5) == 8
    app.backend.store_result("t3", None, states.STARTED)
    threading.Timer(0.2, app.backend.store_result, ("t3", 9, states.SUCCESS)).start()
    assert app.AsyncResult("t3").get(timeout=5, on_message=lambda m: None) == 9
    assert r.dbsize() == 0


def test_read_once_blocking_hands_result_to_one_waiter(make_app: Any, r: redis.Redis) -> None:
    app = make_app(perkey_read_once=True)
    got: list[Any] = []
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            got.append(app.AsyncResult("t1").get(timeout=1.5))
        except TimeoutError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wait) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_for_blocked_clients(r, 3)
    app.backend.store_result("t1", "once", states.SUCCESS)
    for thread in threads:
        thread.join(10)
    assert got == ["once"]
    assert len(errors) == 2
    assert r.dbsize() == 0


def test_timeout_is_a_float_and_enforced(app: Any) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="t-late"):
        app.AsyncResult("t-late").get(timeout=0.3)
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 0.3 + 3


def test_timeout_zero_does_not_block(app: Any) -> None:
    with pytest.raises(TimeoutError):
        app.AsyncResult("t1").get(timeout=0)
    app.backend.store_result("t1", 3, states.SUCCESS)
    assert app.AsyncResult("t1").get(timeout=0) == 3


def test_long_wait_is_split_below_socket_timeout_and_silent(
    make_app: Any, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(redis_socket_timeout=0.5)
    _store_later(app, "t1", "late", 1.6)
    before = command_calls(r)
    with caplog.at_level(logging.DEBUG):
        assert app.AsyncResult("t1").get(timeout=None) == "late"
    assert command_calls(r)["blmove"] - before["blmove"] >= 3
    noisy = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert noisy == []


def test_no_pubsub_anywhere(make_app: Any) -> None:
    # A server of its own, so that no other test's clients count; the broker lives
    # elsewhere too, since kombu's Redis transport uses pub/sub of its own.
    with EmbeddedServer() as own:
        app = make_app(backend=f"perkey://127.0.0.1:{own.port}/0", broker_url="memory://")
        with running_worker(app):
            app.tasks["t.add"].delay(1, 2).get(timeout=10)
            app.tasks["t.progress"].delay(2, 0.01).get(timeout=10, on_message=lambda m: None)
            app.GroupResult("g", [app.tasks["t.add"].delay(i, i) for i in range(3)]).get(timeout=10)
        r = redis.Redis(port=own.port)
        stats = command_calls(r)
        assert stats["evalsha"] > 0
        assert not {"subscribe", "psubscribe", "ssubscribe", "publish"} & set(stats)
        assert r.pubsub_channels() == []
        assert r.pubsub_numpat() == 0
        r.close()


def test_on_message_sees_every_state_in_order(app: Any, worker: Any) -> None:
    seen: list[tuple[str, Any]] = []
    result = app.tasks["t.progress"].delay(4, 0.1)
    value = result.get(timeout=15, on_message=lambda m: seen.append((m["status"], m["result"])))
    assert value == "finished"
    assert seen[-1] == (states.SUCCESS, "finished")
    progress = [r["step"] for s, r in seen if s == "PROGRESS"]
    assert progress == sorted(progress)
    assert progress[-1] == 3
    # The first message is the state when the wait began, as with redis://.
    assert seen[0][0] in (states.PENDING, states.STARTED, "PROGRESS")


def test_on_message_on_a_ready_result(app: Any) -> None:
    app.backend.store_result("t1", 5, states.SUCCESS)
    seen: list[Any] = []
    assert app.AsyncResult("t1").get(timeout=5, on_message=seen.append) == 5
    assert [m["status"] for m in seen] == [states.SUCCESS]


def test_on_message_times_out(app: Any) -> None:
    seen: list[Any] = []
    with pytest.raises(TimeoutError):
        app.AsyncResult("t1").get(timeout=0.3, on_message=seen.append)
    assert [m["status"] for m in seen] == [states.PENDING]


def test_state_and_info_while_running(app: Any, worker: Any) -> None:
    result = app.tasks["t.progress"].delay(30, 0.05)
    deadline = time.monotonic() + 10
    while result.state != "PROGRESS":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert result.info["of"] == 30
    assert not result.ready()
    assert result.get(timeout=15) == "finished"


def test_brpoplpush_on_servers_without_blmove(make_app: Any) -> None:
    with EmbeddedServer(args=["--rename-command", "BLMOVE", ""]) as old:
        app = make_app(backend=f"perkey://127.0.0.1:{old.port}/0")
        _store_later(app, "t1", "via brpoplpush", 0.2)
        assert app.AsyncResult("t1").get(timeout=5) == "via brpoplpush"
        assert app.AsyncResult("t1").get(timeout=5) == "via brpoplpush"
        client = redis.Redis(port=old.port)
        assert client.info("commandstats")["cmdstat_brpoplpush"]["calls"] >= 1
        client.close()
