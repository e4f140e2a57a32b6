"""Canvas: chains, groups and chords, with a real worker."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from celery import chain, chord, group, states
from celery.exceptions import ChordError, TimeoutError
from celery.result import GroupResult, ResultSet

from .conftest import Boom, command_calls, running_worker


def test_chain(app: Any, worker: Any) -> None:
    add = app.tasks["t.add"]
    result = chain(add.s(1, 2), add.s(3), add.s(4))()
    assert result.get(timeout=10) == 10
    assert result.parent.get(timeout=10) == 6


def test_failing_chain_fails_the_last_result(app: Any, worker: Any) -> None:
    result = chain(app.tasks["t.fail"].s(), app.tasks["t.echo"].s())()
    with pytest.raises(Boom):
        result.get(timeout=10)


def test_group_get_join_and_join_native(app: Any, worker: Any) -> None:
    add = app.tasks["t.add"]
    result = group(add.s(i, i) for i in range(20))()
    expected = [i * 2 for i in range(20)]
    assert result.get(timeout=10) == expected
    assert result.join(timeout=10) == expected
    assert result.join_native(timeout=10) == expected
    assert result.ready()
    assert result.successful()
    assert result.completed_count() == 20


def test_group_save_restore_delete(app: Any, worker: Any, r: redis.Redis) -> None:
    result = group(app.tasks["t.add"].s(i, 1) for i in range(3))()
    result.get(timeout=10)
    result.save()
    key = app.backend.get_key_for_group(result.id)
    assert r.pttl(key) > 0
    restored = GroupResult.restore(result.id, app=app)
    assert restored is not None
    assert restored.id == result.id
    assert restored.get(timeout=10) == [1, 2, 3]
    restored.delete()
    assert GroupResult.restore(result.id, app=app) is None


@pytest.mark.parametrize("how", ["join", "join_native", "get"])
def test_joins_read_stored_results_in_one_round_trip(app: Any, r: redis.Redis, how: str) -> None:
    ids = [f"t{i}" for i in range(200)]
    for i, task_id in enumerate(ids):
        app.backend.store_result(task_id, i, states.SUCCESS)
    result = ResultSet([app.AsyncResult(t) for t in ids], app=app)
    before = command_calls(r)
    assert getattr(result, how)(timeout=5) == list(range(200))
    diff = command_calls(r) - before
    # Every result came from the first pipelined read: no per-result round trips.
    assert diff["lindex"] == 200
    assert diff["blmove"] == 0


def test_join_blocks_only_on_what_is_missing(app: Any, r: redis.Redis) -> None:
    for i in range(5):
        app.backend.store_result(f"t{i}", i, states.SUCCESS)

    def late() -> None:
        time.sleep(0.3)
        app.backend.store_result("t5", 5, states.SUCCESS)
        time.sleep(0.2)
        app.backend.store_result("t6", 6, states.SUCCESS)

    threading.Thread(target=late, daemon=True).start()
    result = app.GroupResult("g1", [app.AsyncResult(f"t{i}") for i in range(7)])
    before = command_calls(r)
    assert result.get(timeout=10) == list(range(7))
    assert (command_calls(r) - before)["blmove"] <= 2


def test_join_shares_one_deadline(app: Any) -> None:
    app.backend.store_result("t0", 0, states.SUCCESS)
    result = app.GroupResult("g1", [app.AsyncResult(f"t{i}") for i in range(4)])
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        result.get(timeout=0.5)
    assert time.monotonic() - started < 0.5 + 3


def test_result_set_iteration(app: Any) -> None:
    for i in range(3):
        app.backend.store_result(f"t{i}", i, states.SUCCESS)
    result = app.GroupResult("g1", [app.AsyncResult(f"t{i}") for i in range(3)])
    assert sorted(meta["result"] for _, meta in result.iter_native(timeout=5)) == [0, 1, 2]
    assert [r.get(timeout=5) for r in result] == [0, 1, 2]


@pytest.mark.parametrize("ordered", [True, False])
def test_chord(make_app: Any, ordered: bool) -> None:
    app = make_app(result_backend_transport_options={"result_chord_ordered": ordered})
    with running_worker(app):
        header = [app.tasks["t.sleep"].s(0.01 * (5 - i), i) for i in range(5)]
        result = chord(header)(app.tasks["t.echo"].s())
        values = result.get(timeout=15)
    if ordered:
        assert values == [0, 1, 2, 3, 4]
    else:
        assert sorted(values) == [0, 1, 2, 3, 4]


def test_chord_keys_share_the_group_slot_and_are_cleaned(app: Any, worker: Any, r: Any) -> None:
    from redis.cluster import key_slot

    add = app.tasks["t.add"]
    result = chord([add.s(i, i) for i in range(3)])(app.tasks["t.tsum"].s())
    assert result.get(timeout=15) == 6
    gid = result.parent.id if result.parent is not None else None
    leftover = [k for k in r.keys(app.backend.layout.chord("*", "*")) if b"}:c" not in k]
    assert leftover == []
    if gid:
        slots = {key_slot(k.encode()) for k in app.backend.layout.chord_keys(gid)}
        slots.add(key_slot(app.backend.get_key_for_group(gid).encode()))
        assert len(slots) == 1


def test_chord_parts_that_return_before_the_size_is_set(app: Any, worker: Any) -> None:
    from celery.app.task import Context

    # Celery sets a chord's size only as it sends the header's last task, so the
    # first parts can have returned already; they must still count.
    body = app.tasks["t.tsum"].s().freeze()
    gid = "g-early"

    def part(i: int) -> Context:
        return Context(
            id=f"h{i}", group=gid, group_index=i, chord=app.tasks["t.tsum"].s().set(task_id=body.id)
        )

    app.backend.on_chord_part_return(part(0), states.SUCCESS, 1)
    app.backend.on_chord_part_return(part(1), states.SUCCESS, 2)
    app.backend.set_chord_size(gid, 3)
    app.backend.on_chord_part_return(part(2), states.SUCCESS, 3)
    app.backend.on_chord_part_return(part(2), states.SUCCESS, 3)  # a duplicate delivery
    assert app.AsyncResult(body.id).get(timeout=10) == 6


def test_generator_header_chord(app: Any, worker: Any) -> None:
    add, tsum = app.tasks["t.add"], app.tasks["t.tsum"]
    for _ in range(3):
        assert chord(add.s(i, 1) for i in range(10))(tsum.s()).get(timeout=15) == 55


def test_chord_with_failing_header(app: Any, worker: Any) -> None:
    header = [app.tasks["t.add"].s(1, 1), app.tasks["t.fail"].s("header broke")]
    result = chord(header)(app.tasks["t.tsum"].s())
    # Not propagating: get() would otherwise re-raise the header's own error if it is
    # already stored when the wait begins (follow_parents), as with every backend.
    value = result.get(timeout=15, propagate=False)
    assert isinstance(value, ChordError)
    assert "header broke" in str(value)
    assert result.state == states.FAILURE


def test_nested_chords(app: Any, worker: Any) -> None:
    add, tsum = app.tasks["t.add"], app.tasks["t.tsum"]
    inner = chord([add.s(1, 1), add.s(2, 2)], tsum.s())
    outer = chord([inner, add.s(10, 10)], tsum.s())
    assert outer().get(timeout=20) == 26


def _canvases(app: Any) -> dict[str, Any]:
    add, echo, tsum = app.tasks["t.add"], app.tasks["t.echo"], app.tasks["t.tsum"]
    return {
        "group in chord header": chord(group(add.s(1, 1), group(add.s(2, 2), add.s(3, 3))))(
            echo.s()
        ),
        "chord in chord header": chord([chord([add.s(1, 1), add.s(2, 2)], echo.s()), add.s(5, 5)])(
            echo.s()
        ),
        "group of chains": group(chain(add.s(1, 1), add.s(1)), chain(add.s(2, 2), add.s(2)))(),
        "chain of groups": chain(group(add.s(1, 1), add.s(2, 2)), tsum.s())(),
    }


def test_canvas_results_match_celerys_redis_backend(make_app: Any, server: Any) -> None:
    outcomes = {}
    for url in (f"redis://127.0.0.1:{server.port}/2", f"perkey://127.0.0.1:{server.port}/0"):
        app = make_app(backend=url)
        with running_worker(app):
            outcomes[url.split(":")[0]] = {
                name: result.get(timeout=20) for name, result in _canvases(app).items()
            }
    assert outcomes["perkey"] == outcomes["redis"]


def test_chain_into_chord(app: Any, worker: Any) -> None:
    add, tsum = app.tasks["t.add"], app.tasks["t.tsum"]
    workflow = chain(add.s(1, 1), chord([add.s(1), add.s(2)], tsum.s()))
    assert workflow().get(timeout=20) == 7


def test_add_to_chord(app: Any, worker: Any) -> None:
    add, grow, echo = app.tasks["t.add"], app.tasks["t.grow"], app.tasks["t.echo"]
    result = chord([grow.s(5), add.s(1, 1)])(echo.s())
    assert sorted(result.get(timeout=15)) == [2, 5, 10]


def test_join_native_with_on_message(app: Any) -> None:
    app.backend.store_result("t0", 0, states.SUCCESS)
    _late = threading.Timer(0.2, app.backend.store_result, ("t1", 1, states.SUCCESS))
    _late.start()
    seen: list[Any] = []
    result = app.GroupResult("g1", [app.AsyncResult("t0"), app.AsyncResult("t1")])
    assert result.join_native(timeout=5, on_message=seen.append) == [0, 1]
    assert sorted(m["result"] for m in seen) == [0, 1]
    # A second join is served from the backend's result cache where Celery keeps one.
    assert result.join_native(timeout=5) == [0, 1]


def test_saved_chord_header_is_joined_with_its_structure(app: Any, worker: Any) -> None:
    from celery.app.task import Context

    # Celery saves a chord header that holds groups so the body gets nested lists.
    add = app.tasks["t.add"]
    inner = group(add.s(1, 1), add.s(2, 2)).freeze()
    outer_member = add.s(3, 3).freeze()
    header = app.GroupResult("g-nested", [inner, outer_member])
    body = app.tasks["t.echo"].s().freeze()
    app.backend.apply_chord((header.id, header.results), body)
    for member, value in ((inner.results[0], 2), (inner.results[1], 4), (outer_member, 6)):
        app.backend.store_result(member.id, value, states.SUCCESS)
    app.backend.set_chord_size(header.id, 2)
    for index in range(2):
        request = Context(
            id=f"part{index}", group=header.id, group_index=index,
            chord=app.tasks["t.echo"].s().set(task_id=body.id),
        )  # fmt: skip
        app.backend.on_chord_part_return(request, states.SUCCESS, None)
    assert app.AsyncResult(body.id).get(timeout=10) == [[2, 4], 6]
