"""`celery_perkey_backend.aio` answers as `get()` does, with a real worker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from celery import chord, group, states
from celery.exceptions import TaskRevokedError, TimeoutError

from celery_perkey_backend import aio

from .conftest import Boom


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_wait_returns_the_value(app: Any, worker: Any) -> None:
    assert run(aio.wait(app.tasks["t.add"].delay(2, 3), timeout=10)) == 5


def test_wait_raises_the_tasks_error_or_returns_it(app: Any, worker: Any) -> None:
    with pytest.raises(Boom, match="broke"):
        run(aio.wait(app.tasks["t.fail"].delay("broke"), timeout=10))
    value = run(aio.wait(app.tasks["t.fail"].delay("kept"), timeout=10, propagate=False))
    assert isinstance(value, Boom)


def test_wait_times_out_with_celerys_error(app: Any) -> None:
    with pytest.raises(TimeoutError):
        run(aio.wait(app.AsyncResult("never"), timeout=0.3))


def test_a_revoked_task(app: Any) -> None:
    app.backend.mark_as_revoked("t1", "revoked by test")
    with pytest.raises(TaskRevokedError):
        run(aio.wait(app.AsyncResult("t1"), timeout=5))


def test_a_failed_parent_wins_as_with_get(app: Any, worker: Any) -> None:
    header = [app.tasks["t.fail_later"].s(0.5, "header broke"), app.tasks["t.add"].s(1, 1)]
    result = chord(header)(app.tasks["t.tsum"].s())
    with pytest.raises(Boom, match="header broke"):
        run(aio.wait(result, timeout=15))


def test_a_group_gives_its_values_in_order(app: Any, worker: Any) -> None:
    result = group(app.tasks["t.sleep"].s(0.01 * (5 - i), i) for i in range(5))()
    assert run(aio.wait(result, timeout=15)) == [0, 1, 2, 3, 4]
    failing = group(app.tasks["t.add"].s(1, 1), app.tasks["t.fail"].s("member broke"))()
    with pytest.raises(Boom, match="member broke"):
        run(aio.wait(failing, timeout=15))


def test_as_completed_yields_in_order_of_completion(app: Any, worker: Any) -> None:
    slow = app.tasks["t.sleep"].delay(0.6, "slow")
    fast = app.tasks["t.sleep"].delay(0.05, "fast")

    async def collect() -> list[tuple[str, Any]]:
        return [(r.id, r.result) async for r in aio.as_completed([slow, fast], timeout=15)]

    assert run(collect()) == [(fast.id, "fast"), (slow.id, "slow")]
    # Each yielded result has its state in hand: no read left to make.
    assert slow.state == states.SUCCESS


def test_watch_yields_every_state_then_the_final_one(app: Any, worker: Any) -> None:
    result = app.tasks["t.progress"].delay(4, 0.1)

    async def collect() -> list[tuple[str, Any]]:
        return [(m["status"], m["result"]) async for m in aio.watch(result, timeout=15)]

    seen = run(collect())
    assert seen[0][0] in (states.PENDING, states.STARTED, "PROGRESS")
    assert seen[-1] == (states.SUCCESS, "finished")
    steps = [r["step"] for status, r in seen if status == "PROGRESS"]
    assert steps == sorted(steps)
    assert steps[-1] == 3


def test_concurrent_waits_on_one_loop(app: Any, worker: Any) -> None:
    async def many() -> list[int]:
        results = [app.tasks["t.add"].delay(i, i) for i in range(200)]
        return list(await asyncio.gather(*(aio.wait(r, timeout=30) for r in results)))

    assert run(many()) == [2 * i for i in range(200)]
