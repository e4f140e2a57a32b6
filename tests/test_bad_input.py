"""Bad input gets a clear error naming what was wrong, and nothing else is lost."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from celery import states
from celery.exceptions import BackendStoreError

from .conftest import running_worker

ODD_IDS = ["a*b?c[d]e\\f", "has space", "ünïcödé-☃", "x" * 500, "a}b{c", "{tag}", "*"]


@pytest.mark.parametrize("task_id", ODD_IDS)
def test_odd_task_ids_round_trip(app: Any, r: redis.Redis, task_id: str) -> None:
    app.backend.store_result(task_id, {"id": task_id}, states.SUCCESS)
    assert app.AsyncResult(task_id).get(timeout=2) == {"id": task_id}
    app.backend.store_result(task_id + "-p", {"p": 1}, "PROGRESS")
    assert app.AsyncResult(task_id + "-p").info == {"p": 1}


def test_odd_ids_never_make_the_sweep_match_other_keys(make_app: Any, r: redis.Redis) -> None:
    app = make_app()
    app.conf.result_expires = None
    for task_id in ODD_IDS:
        app.backend.store_result(task_id, 1, states.SUCCESS)
    strangers = ["celery-perkeyXr:{*}", "celery-perkey", "celery-task-meta-*", "*"]
    for key in strangers:
        r.set(key, "theirs")
    time.sleep(0.01)  # only keys written before the sweep's start millisecond may go
    summary = app.backend.run_sweep(delete=True, max_age=0)
    assert summary.unlinked >= len(ODD_IDS)
    assert not any(r.exists(app.backend.layout.result(task_id)) for task_id in ODD_IDS)
    assert all(r.get(key) == b"theirs" for key in strangers)


def test_an_oversized_result_fails_the_task_instead_of_hanging(make_app: Any) -> None:
    app = make_app(perkey_max_result_bytes=10_000)
    with running_worker(app):
        result = app.tasks["t.echo"].delay("x" * 20_000)
        with pytest.raises(BackendStoreError) as info:
            result.get(timeout=15)
    assert result.state == states.FAILURE
    assert result.id in str(info.value) or "perkey_max_result_bytes" in str(info.value)
