"""Celery's result semantics, exactly as `redis://` gives them, on every wait path.

Celery's drainer runs ``on_interval`` (where ``get()`` re-raises a failed parent's
error) after every wait step, the step that delivered the result included, before it
returns. So a failed parent's own error wins over the error it caused downstream.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis
from celery import chord, states
from celery.result import ResultSet

from celery_perkey_backend.testing import EmbeddedServer

from .conftest import Boom, running_worker, wait_until


@pytest.mark.parametrize("scheme", ["redis", "perkey"])
def test_a_failed_chord_header_wins_over_the_chord_error(make_app: Any, scheme: str) -> None:
    # A server of its own: redis:// leaves the subscription of a failed get() behind.
    with (
        EmbeddedServer() as own,
        running_worker(
            make_app(backend=f"{scheme}://127.0.0.1:{own.port}/0", broker_url="memory://")
        ) as worker,
    ):
        app = worker.app
        # The header fails only once get() is already waiting on the body.
        header = [app.tasks["t.fail_later"].s(0.5, "header broke"), app.tasks["t.add"].s(1, 1)]
        result = chord(header)(app.tasks["t.tsum"].s())
        with pytest.raises(Boom, match="header broke"):
            result.get(timeout=15)
        if scheme == "redis":
            # Its failed get() left the task subscribed (celery#3808): unsubscribe while
            # the server runs, or collecting the result retries for 20 s later on.
            app.backend.result_consumer.cancel_for(result.id)


def test_a_failed_header_wins_with_an_errback_too(app: Any, worker: Any) -> None:
    body = app.tasks["t.tsum"].s().on_error(app.tasks["t.echo"].s())
    result = chord([app.tasks["t.fail_later"].s(0.5, "header broke")])(body)
    with pytest.raises(Boom, match="header broke"):
        result.get(timeout=15)


class ParentFailed(Exception):
    """What the test's on_interval raises once the result is stored, as a parent's
    error would be raised by Celery's own on_interval."""


def _waiting_on(app: Any, r: redis.Redis, task_id: str) -> bool:
    """Whether a wait on ``task_id`` has begun: a client blocked on a result list (the
    only list waited on here), or the process's inbox registered for the task (a
    multiplexed wait; the multiplexer's own reader blocks on its inbox even between
    waits, so a blocked client alone says nothing)."""
    blocked = r.client_list()
    lists = any("b" in c["flags"] and c["cmd"] in ("blmove", "brpoplpush") for c in blocked)
    return lists or bool(r.exists(app.backend.layout.watchers(task_id)))


def _store_once_waiting(app: Any, r: redis.Redis, task_id: str, stored: threading.Event) -> None:
    def run() -> None:
        wait_until(lambda: _waiting_on(app, r, task_id), f"a wait on {task_id} has begun")
        stored.set()  # before the store: the step that sees it always finds it set
        app.backend.store_result(task_id, "late", states.SUCCESS)

    threading.Thread(target=run, daemon=True).start()


def _interval(stored: threading.Event) -> Any:
    def on_interval() -> None:
        if stored.is_set():
            raise ParentFailed()

    return on_interval


WAYS = {
    "get": lambda app, on_interval: app.AsyncResult("t1").get(timeout=10, on_interval=on_interval),
    "get with on_message": lambda app, on_interval: app.AsyncResult("t1").get(
        timeout=10, on_interval=on_interval, on_message=lambda meta: None
    ),
    "join_native": lambda app, on_interval: ResultSet(
        [app.AsyncResult("t0"), app.AsyncResult("t1")], app=app
    ).join_native(timeout=10, on_interval=on_interval),
    "get_many": lambda app, on_interval: dict(
        app.backend.get_many(["t0", "t1"], timeout=10, on_interval=on_interval)
    ),
}


@pytest.mark.parametrize("read_once", [False, True], ids=["rotating", "read-once"])
@pytest.mark.parametrize("way", list(WAYS))
def test_on_interval_runs_after_the_step_that_delivered(
    make_app: Any, r: redis.Redis, way: str, read_once: bool
) -> None:
    app = make_app(perkey_read_once=read_once)
    app.backend.store_result("t0", "early", states.SUCCESS)
    stored = threading.Event()
    _store_once_waiting(app, r, "t1", stored)
    with pytest.raises(ParentFailed):
        WAYS[way](app, _interval(stored))


def test_a_result_ready_before_the_wait_raises_its_own_error(app: Any) -> None:
    # No wait step runs, so on_interval does not either: the result's own error wins.
    app.backend.store_result("t1", Boom("own"), states.FAILURE)
    with pytest.raises(Boom, match="own"):
        app.AsyncResult("t1").get(timeout=5, on_interval=_interval(threading.Event()))


def test_on_message_follows_a_task_run_by_a_redis_worker(
    make_app: Any, server: Any, r: redis.Redis
) -> None:
    """A switch from redis://: the old worker's states reach on_message as they change."""
    old = make_app(backend=f"redis://127.0.0.1:{server.port}/0")
    app = make_app()
    old.backend.store_result("t1", {"step": 1}, "PROGRESS")
    seen: list[tuple[str, Any]] = []
    first_seen, second_seen = threading.Event(), threading.Event()

    def on_message(meta: dict[str, Any]) -> None:
        seen.append((meta["status"], meta["result"]))
        first_seen.set()
        if meta["result"] == {"step": 2}:
            second_seen.set()

    def old_worker() -> None:
        first_seen.wait(10)
        old.backend.store_result("t1", {"step": 2}, "PROGRESS")
        second_seen.wait(10)
        old.backend.store_result("t1", "done by the old worker", states.SUCCESS)

    threading.Thread(target=old_worker, daemon=True).start()
    assert app.AsyncResult("t1").get(timeout=10, on_message=on_message) == "done by the old worker"
    assert seen == [
        ("PROGRESS", {"step": 1}),
        ("PROGRESS", {"step": 2}),
        (states.SUCCESS, "done by the old worker"),
    ]
