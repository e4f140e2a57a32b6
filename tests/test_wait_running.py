"""A multiplexed wait that begins while its task runs waits for the result.

Registering a wait hands it the task's state as it stands first; for a running task
that is STARTED or PROGRESS, which must not end a wait for the result (it once did:
``get()`` and ``aio.wait`` returned the STARTED info as the task's value).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery, states
from celery.exceptions import TimeoutError
from celery.result import AsyncResult

from celery_perkey_backend import aio

from .conftest import wait_until


def _running(app: Celery, task_id: str) -> AsyncResult:
    app.backend.store_result(task_id, {"pid": 1, "hostname": "w"}, states.STARTED)
    app.backend.store_result(task_id, {"done": 1}, "PROGRESS")
    return app.AsyncResult(task_id)


def _store_once_waited(app: Celery, task_id: str, value: Any) -> threading.Thread:
    """Store ``value`` as the task's result once a wait on it is registered."""
    mux = app.backend.waiter.mux

    def run() -> None:
        wait_until(lambda: mux.waits >= 1, "the wait is registered")
        app.backend.store_result(task_id, value, states.SUCCESS)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _get(result: AsyncResult, timeout: float) -> Any:
    return result.get(timeout=timeout)


def _aio_wait(result: AsyncResult, timeout: float) -> Any:
    return asyncio.run(aio.wait(result, timeout=timeout))


@pytest.mark.parametrize("wait", [_get, _aio_wait], ids=["get", "aio.wait"])
def test_a_wait_begun_while_the_task_runs_waits_for_its_result(
    make_app: Callable[..., Celery], wait: Callable[[AsyncResult, float], Any]
) -> None:
    app = make_app(perkey_multiplex=True)
    assert app.backend.waiter.multiplex
    result = _running(app, "running-1")
    with pytest.raises(TimeoutError):
        wait(result, 0.3)
    assert result.state == "PROGRESS"
    storer = _store_once_waited(app, "running-1", {"answer": 42})
    assert wait(app.AsyncResult("running-1"), 10) == {"answer": 42}
    storer.join(10)


def test_as_completed_yields_only_what_is_ready(make_app: Callable[..., Celery]) -> None:
    app = make_app()
    running = _running(app, "running-2")
    app.backend.store_result("done-2", 7, states.SUCCESS)
    yielded: list[str] = []

    async def collect() -> None:
        async for done in aio.as_completed([running, app.AsyncResult("done-2")], timeout=0.3):
            yielded.append(done.id)

    with pytest.raises(TimeoutError):
        asyncio.run(collect())
    assert yielded == ["done-2"]
