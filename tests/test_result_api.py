"""Celery's result API, end to end with a real in-process worker.

This module runs on the fixtures users get from ``pytest_plugins =
["celery_perkey_backend.testing"]`` (README, "Testing your own tasks"): Celery's
``celery_app`` and ``celery_worker``, pointed at ``perkey_url`` by ``celery_config``.
``app`` and ``worker`` are the same objects under the names the rest of the suite uses.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Mapping
from typing import Any

import pytest
import redis
from celery import Celery, states
from celery.exceptions import TimeoutError
from celery.signals import task_postrun

from .conftest import READER, Boom, register_tasks, running_worker, wait_until


@pytest.fixture
def celery_config(r: redis.Redis, perkey_url: str, perkey_broker_url: str) -> Mapping[str, Any]:
    # ``r`` first: it empties the server before the app and its worker use it.
    return {
        "broker_url": perkey_broker_url,
        "result_backend": perkey_url,
        "task_track_started": True,
        "broker_connection_retry_on_startup": True,
    }


@pytest.fixture(scope="session")
def celery_worker_pool() -> str:
    return "threads"


@pytest.fixture(scope="session")
def celery_worker_parameters() -> Mapping[str, Any]:
    # No ping task: its result would be one more key in the database.
    return {"concurrency": 4, "perform_ping_check": False}


@pytest.fixture
def celery_app(celery_app: Celery) -> Celery:
    register_tasks(celery_app)
    return celery_app


@pytest.fixture
def app(celery_app: Celery) -> Celery:
    return celery_app


@pytest.fixture
def worker(celery_worker: Any) -> Any:
    return celery_worker


def test_get_ready_successful_and_state(app: Any, worker: Any) -> None:
    result = app.tasks["t.add"].delay(2, 3)
    assert result.get(timeout=10) == 5
    assert result.ready()
    assert result.successful()
    assert not result.failed()
    assert result.state == result.status == states.SUCCESS
    assert result.result == result.info == 5
    assert result.traceback is None
    assert isinstance(result.date_done, datetime.datetime)
    assert result.exists()


def test_pending_is_the_absence_of_a_key(app: Any) -> None:
    result = app.AsyncResult("never-sent")
    assert result.state == states.PENDING
    assert not result.ready()
    assert not result.exists()
    assert result.result is None


def test_failure_comes_back_as_its_own_type(app: Any, worker: Any) -> None:
    result = app.tasks["t.fail"].delay("it broke")
    with pytest.raises(Boom, match="it broke"):
        result.get(timeout=10)
    assert result.failed()
    assert result.state == states.FAILURE
    assert isinstance(result.result, Boom)
    assert "Boom" in result.traceback
    builtin = app.tasks["t.keyerror"].delay()
    with pytest.raises(KeyError):
        builtin.get(timeout=10)


def test_propagate_false_returns_the_exception(app: Any, worker: Any) -> None:
    result = app.tasks["t.fail"].delay()
    value = result.get(timeout=10, propagate=False)
    assert isinstance(value, Boom)


def test_interval_and_disable_sync_subtasks_are_accepted(app: Any, worker: Any) -> None:
    result = app.tasks["t.add"].delay(1, 1)
    assert result.get(timeout=10, interval=0.01, disable_sync_subtasks=False) == 2


def test_get_times_out(app: Any, worker: Any) -> None:
    result = app.tasks["t.sleep"].delay(2)
    with pytest.raises(TimeoutError):
        result.get(timeout=0.2)
    assert result.get(timeout=10) is None


def test_children(app: Any, worker: Any) -> None:
    result = app.tasks["t.spawn"].delay(3)
    assert result.get(timeout=10) == 3
    children = result.children
    assert len(children) == 3
    assert [child.get(timeout=10) for child in children] == [0, 2, 4]


def test_result_extended(make_app: Any) -> None:
    app = make_app(result_extended=True)
    with running_worker(app):
        result = app.tasks["t.add"].apply_async((4, 5), queue="celery")
        assert result.get(timeout=10) == 9
    fresh = app.AsyncResult(result.id)
    assert fresh.name == "t.add"
    assert fresh.args == [4, 5]
    assert fresh.kwargs == {}
    assert fresh.worker
    assert fresh.retries == 0
    assert fresh.queue == "celery"


def test_retry_is_visible_and_does_not_end_the_wait(app: Any, worker: Any, r: Any) -> None:
    seen: list[str] = []
    go_key = "test:retry-go"

    def on_message(meta: dict[str, Any]) -> None:
        seen.append(meta["status"])
        r.rpush(go_key, "go")  # the task retries only once the wait follows it

    result = app.tasks["t.retry_once"].delay(go_key)
    assert result.get(timeout=15, on_message=on_message) == "retried 1"
    assert seen[-1] == states.SUCCESS
    assert states.RETRY in seen


def test_ignore_result(app: Any, worker: Any, r: Any) -> None:
    finished: set[str] = set()

    def on_postrun(task_id: str | None = None, **kwargs: Any) -> None:
        finished.add(str(task_id))

    # task_postrun comes after the worker would have stored a result.
    task_postrun.connect(on_postrun, weak=False)
    try:
        result = app.tasks["t.quiet"].delay()
        assert result.get(timeout=1) is None
        wait_until(lambda: result.id in finished, "the task has run")
    finally:
        task_postrun.disconnect(on_postrun)
    assert not r.keys(app.backend.layout.result("*"))
    assert not r.keys(app.backend.layout.progress("*"))


def test_forget(app: Any, worker: Any, r: Any) -> None:
    result = app.tasks["t.add"].delay(1, 2)
    assert result.get(timeout=10) == 3
    result.forget()
    assert app.AsyncResult(result.id).state == states.PENDING
    assert r.dbsize() == 0


def test_revoked(app: Any, worker: Any) -> None:
    result = app.tasks["t.add"].apply_async((1, 1), countdown=30)
    result.revoke()
    app.backend.mark_as_revoked(result.id, "revoked by test")
    assert result.state == states.REVOKED
    with pytest.raises(Exception, match=r"revoked|Revoked|TaskRevokedError"):
        result.get(timeout=5)


def test_revoked_by_worker(app: Any, worker: Any) -> None:
    # Revokes are broadcast; make sure the worker listens before sending one.
    deadline = time.monotonic() + 15
    while not app.control.ping(timeout=0.5):
        assert time.monotonic() < deadline, "worker never answered a ping"
    result = app.tasks["t.add"].apply_async((1, 1), countdown=2)
    result.revoke()
    with pytest.raises(Exception, match="revoked"):
        result.get(timeout=10)
    assert result.state == states.REVOKED


def test_cross_process_reader_of_worker_result(app: Any, worker: Any, backend_url: str) -> None:
    import subprocess
    import sys

    result = app.tasks["t.sleep"].delay(0.5, "from worker")
    out = subprocess.run(
        [sys.executable, "-c", READER, backend_url, result.id],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert out.strip() == "'from worker'"
