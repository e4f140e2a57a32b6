"""Waiting through the multiplexer answers as waiting on a connection of its own does.

Every case runs twice, with ``perkey_multiplex`` off and on, against the same
expectations: what is already stored is returned even with ``timeout=0``, what is not
times out by the deadline, read-once hands a result out once.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from celery import states
from celery.exceptions import TimeoutError

#: How far past its deadline a wait may end here: the promise is about 0.5 s, the rest
#: is room for a loaded test machine.
SLACK = 2.0

PATHS = [False, True]


@pytest.fixture(params=PATHS, ids=["own-connection", "multiplexed"])
def both(request: pytest.FixtureRequest, make_app: Any) -> Any:
    def factory(**conf: Any) -> Any:
        return make_app(perkey_multiplex=request.param, **conf)

    return factory


def _stored(app: Any, count: int, prefix: str = "t") -> list[Any]:
    for i in range(count):
        app.backend.store_result(f"{prefix}{i}", i, states.SUCCESS)
    return [app.AsyncResult(f"{prefix}{i}") for i in range(count)]


def test_get_timeout_zero_returns_a_stored_result(both: Any) -> None:
    app = both()
    (result,) = _stored(app, 1)
    assert result.get(timeout=0) == 0


def test_get_timeout_zero_of_nothing_stored_times_out_at_once(both: Any) -> None:
    app = both()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        app.AsyncResult("missing").get(timeout=0)
    assert time.monotonic() - started < 0 + SLACK


def test_get_of_nothing_stored_times_out_by_its_deadline(both: Any) -> None:
    app = both()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        app.AsyncResult("missing").get(timeout=0.5)
    assert time.monotonic() - started < 0.5 + SLACK


def test_join_native_timeout_zero_returns_results_that_are_ready(both: Any) -> None:
    # Celery's integration test of the same name.
    app = both()
    results = _stored(app, 3)
    assert app.ResultSet(results).join_native(timeout=0) == [0, 1, 2]


def test_join_native_timeout_zero_hands_on_what_is_ready_then_times_out(both: Any) -> None:
    app = both()
    results = [*_stored(app, 3), app.AsyncResult("missing")]
    seen: list[tuple[str, Any]] = []
    with pytest.raises(TimeoutError):
        app.ResultSet(results).join_native(
            timeout=0, callback=lambda task_id, value: seen.append((task_id, value))
        )
    assert sorted(seen) == [("t0", 0), ("t1", 1), ("t2", 2)]


def test_join_timeout_zero_returns_results_that_are_ready(both: Any) -> None:
    app = both()
    results = _stored(app, 3)
    assert app.ResultSet(results).join(timeout=0) == [0, 1, 2]


def test_get_many_timeout_zero(both: Any) -> None:
    app = both()
    _stored(app, 2)
    found = dict(app.backend.get_many(["t0", "t1"], timeout=0))
    assert {tid: meta["result"] for tid, meta in found.items()} == {"t0": 0, "t1": 1}


def test_get_with_on_message_of_a_stored_result(both: Any) -> None:
    app = both()
    (result,) = _stored(app, 1)
    messages: list[dict[str, Any]] = []
    assert result.get(timeout=0, on_message=messages.append) == 0
    assert [meta["status"] for meta in messages] == [states.SUCCESS]


def test_get_of_a_failure(both: Any) -> None:
    app = both()
    app.backend.store_result("t1", KeyError("gone"), states.FAILURE)
    with pytest.raises(KeyError):
        app.AsyncResult("t1").get(timeout=0)
    assert isinstance(app.AsyncResult("t1").get(timeout=0, propagate=False), KeyError)


def test_read_once_hands_a_stored_result_out_once(both: Any) -> None:
    app = both(perkey_read_once=True)
    (result,) = _stored(app, 1)
    assert result.get(timeout=0) == 0
    with pytest.raises(TimeoutError):
        app.AsyncResult("t0").get(timeout=0)


def test_a_result_stored_during_the_wait(both: Any) -> None:
    app = both()
    outcome: list[Any] = []
    waiting = threading.Thread(target=lambda: outcome.append(app.AsyncResult("t1").get(timeout=10)))
    waiting.start()
    app.backend.store_result("t1", "later", states.SUCCESS)
    waiting.join(30)
    assert outcome == ["later"]
