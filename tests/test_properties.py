"""Property-based: any sequence of stores keeps Celery's guarantees."""

from __future__ import annotations

import itertools
from typing import Any

import redis
from celery import states
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

STATES = [
    states.STARTED,
    states.RETRY,
    "PROGRESS",
    "CUSTOM",
    states.SUCCESS,
    states.FAILURE,
    states.REVOKED,
]
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=5,
)
stores = st.lists(st.tuples(st.sampled_from(STATES), values), min_size=1, max_size=8)
_ids = itertools.count()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sequence=stores, expires=st.sampled_from([None, 3600]))
def test_any_sequence_of_stores(
    make_app: Any, r: redis.Redis, sequence: list[tuple[str, Any]], expires: int | None
) -> None:
    app = make_app()
    app.conf.result_expires = expires
    task_id = f"prop-{next(_ids)}"
    accepted: tuple[str, Any] | None = None
    for state, value in sequence:
        # Celery stores an exception for FAILURE, RETRY and REVOKED.
        result = ValueError(str(value)) if state in states.EXCEPTION_STATES else value
        app.backend.store_result(task_id, result, state)
        if accepted is None or accepted[0] != states.SUCCESS:
            accepted = (state, value)
    assert accepted is not None
    meta = app.backend.get_task_meta(task_id, cache=False)
    # SUCCESS is final, and otherwise the last store wins.
    assert meta["status"] == accepted[0]
    if accepted[0] in states.EXCEPTION_STATES:
        assert isinstance(meta["result"], ValueError)
        assert str(meta["result"]) == str(accepted[1])
    else:
        assert meta["result"] == accepted[1]
    # Every key of the task has a TTL exactly when result_expires is set; once the task
    # is ready, no intermediate state is kept.
    rkey, skey = app.backend.layout.result(task_id), app.backend.layout.state(task_id)
    if r.exists(rkey):
        assert (r.pttl(rkey) > 0) == (expires is not None)
    if accepted[0] in states.READY_STATES:
        assert not r.exists(skey)
    else:
        assert (r.pttl(skey) > 0) == (expires is not None)
    # A ready state is one element of one list, and only ready states are there.
    rkey = app.backend.layout.result(task_id)
    if accepted[0] in states.READY_STATES:
        assert r.llen(rkey) == 1
    else:
        assert not r.exists(rkey)
