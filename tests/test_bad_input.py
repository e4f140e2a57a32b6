"""Bad input gets a clear error naming what was wrong, and nothing else is lost."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
import redis
from celery import states
from celery.exceptions import BackendStoreError

from celery_perkey_backend import AccessDeniedError, InvalidIdError, StoreCommandError
from celery_perkey_backend.testing import EmbeddedServer

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
    assert result.id in str(info.value)
    assert "perkey_max_result_bytes" in str(info.value)


@pytest.mark.parametrize("task_id", ["", "lone\ud800surrogate"])
def test_ids_no_key_can_be_made_of_are_refused(app: Any, task_id: str) -> None:
    for call in (
        lambda: app.backend.store_result(task_id, 1, states.SUCCESS),
        lambda: app.AsyncResult(task_id).get(timeout=1),
        lambda: app.AsyncResult(task_id).state,
    ):
        with pytest.raises(ValueError, match="task id") as info:
            call()
        assert isinstance(info.value, InvalidIdError)
        assert repr(task_id) in str(info.value)
        assert not isinstance(info.value, UnicodeError)


def test_a_huge_id_works_and_errors_quote_it_briefly(app: Any, r: redis.Redis) -> None:
    task_id = "x" * 10_000
    app.backend.store_result(task_id, "big id", states.SUCCESS)
    assert app.AsyncResult(task_id).get(timeout=2) == "big id"
    r.delete(app.backend.layout.result(task_id))
    r.set(app.backend.layout.result(task_id), "the wrong type")
    with pytest.raises(StoreCommandError) as info:
        app.AsyncResult(task_id).get(timeout=1)
    assert len(str(info.value)) < 600
    assert "10000 characters" in str(info.value)


@pytest.fixture
def guarded(server: Any) -> Any:
    with EmbeddedServer(args=["--requirepass", "right-secret"]) as srv:
        yield srv


def test_a_wrong_password_fails_at_once_and_is_not_retried(
    make_app: Any, guarded: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(backend=f"perkey://:wrong-secret@127.0.0.1:{guarded.port}/0")
    with caplog.at_level(logging.WARNING):
        for call in (
            lambda: app.backend.store_result("t1", 1, states.SUCCESS),
            lambda: app.AsyncResult("t1").get(timeout=20),
            lambda: app.AsyncResult("t1").state,
        ):
            started = time.monotonic()
            with pytest.raises(AccessDeniedError) as info:
                call()
            # Far below the 20 retries (about 19 s) a lost connection gets.
            assert time.monotonic() - started < 3
            assert f"127.0.0.1:{guarded.port}" in str(info.value)
            assert "wrong-secret" not in str(info.value)
    assert [rec for rec in caplog.records if "retry" in rec.getMessage()] == []


def test_a_command_the_acl_denies_fails_at_once(make_app: Any, r: redis.Redis, server: Any) -> None:
    r.acl_setuser(
        "meagre",
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        commands=["+@all", "-evalsha", "-eval"],
    )
    try:
        app = make_app(backend=f"perkey://meagre:pw@127.0.0.1:{server.port}/0")
        started = time.monotonic()
        with pytest.raises(AccessDeniedError, match=r"NOPERM|permission"):
            app.backend.store_result("t1", 1, states.SUCCESS)
        assert time.monotonic() - started < 3
    finally:
        r.acl_deluser("meagre")
