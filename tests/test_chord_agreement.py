"""A chord's result agrees with its header's, when a header task's pool child is
SIGKILLed after its part was counted and before its SUCCESS was stored.

Workers run with Celery's defaults: early acknowledgement and
``task_reject_on_worker_lost=False``. The killed task is then recorded as FAILURE
(``WorkerLostError``) by the worker's main process, which also reports the chord part
as failed. The body must fail with ``ChordError``, as with Celery's ``redis://``
backend, which each case also runs for comparison. A hook in the worker
(``PERKEY_TEST_HOLD_STORE`` in tests/worker_app.py) holds the pool child just before
the write, where perkey has already counted the part, so that the test kills it there.

Then the same protocol step by step, with an in-process worker running the bodies
(tests/test_chord_recovery.py's harness): a part counted before its store is "in
flight" until its task reports it, and what the task ended as decides.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from billiard.exceptions import WorkerLostError
from celery import chord, states
from celery.app.task import Context
from celery.exceptions import ChordError

from .conftest import running_worker, stop_process, wait_until
from .processes import celery_worker
from .test_chord_recovery import CLAIM_TTL, Chords

WAIT_S = 60.0
SIDE_DB = 3  # tests/worker_app.py's side channel


class Lost:
    """A chord whose header task ``victim`` is held before its store, then killed."""

    def __init__(self, server: Any, make_app: Any, scheme: str, logs: Path) -> None:
        url = f"{scheme}://127.0.0.1:{server.port}/0"
        self.server = server
        self.url = url
        self.app = make_app(backend=url)  # its client emptied every database
        self.side = redis.Redis(port=server.port, db=SIDE_DB)
        self.broker = redis.Redis(port=server.port, db=1)
        self.logs = logs
        self.workers: list[Any] = []
        self.tag = "lost"

    def worker(self, concurrency: int) -> None:
        env = {"PERKEY_TEST_BACKEND": self.url, "PERKEY_TEST_HOLD_STORE": "1"}
        options = ("--pool=prefork", f"--concurrency={concurrency}")
        self.workers.append(celery_worker(self.server, env, *options, log=self.logs / "worker.log"))

    def send(self, victim: int) -> tuple[Any, list[str]]:
        """Send ``w.mul(i, 1)`` for i < 3 and a body that counts its runs; hold header
        task ``victim``."""
        tag = self.tag
        ids = [f"{tag}-h{i}" for i in range(3)]
        self.side.set("hold", ids[victim])
        header = [self.app.signature("w.mul", args=(i, 1)).set(task_id=ids[i]) for i in range(3)]
        body = self.app.signature("w.count_body", kwargs={"tag": tag})
        return chord(header, body).apply_async(), ids

    def held(self) -> int:
        wait_until(lambda: self.side.get("held") is not None, "a pool child to be held", WAIT_S)
        return int(self.side.get("held") or 0)

    def returned(self, *task_ids: str) -> None:
        wait_until(
            lambda: all(self.side.sismember("returned", tid) for tid in task_ids),
            f"on_chord_part_return of {task_ids}",
            WAIT_S,
        )

    def quiet(self) -> bool:
        """Nothing queued and nothing delivered but unacknowledged."""
        return self.broker.llen("celery") == 0 and self.broker.hlen("unacked") == 0


@pytest.fixture(params=["perkey", "redis"])
def lost(request: Any, server: Any, make_app: Any, tmp_path: Path) -> Iterator[Lost]:
    harness = Lost(server, make_app, request.param, tmp_path)
    try:
        yield harness
    finally:
        for proc in harness.workers:
            stop_process(proc)


def assert_the_chord_agrees(lost: Lost, result: Any, ids: list[str], victim: int) -> None:
    """The header member is FAILURE, the body failed with ChordError naming it, and the
    body never ran."""
    with pytest.raises(ChordError) as raised:
        result.get(timeout=WAIT_S, follow_parents=False)
    assert ids[victim] in str(raised.value)
    assert "WorkerLostError" in str(raised.value)
    member = lost.app.AsyncResult(ids[victim])
    assert member.state == states.FAILURE
    assert type(member.result).__name__ == "WorkerLostError"
    for index, tid in enumerate(ids):
        if index != victim:
            assert lost.app.AsyncResult(tid).get(timeout=WAIT_S) == index
    wait_until(lost.quiet, "the worker to have nothing left to run", WAIT_S)
    assert lost.side.get(f"body-runs:{lost.tag}") is None


def test_a_header_task_lost_first_fails_the_body(lost: Lost) -> None:
    """The killed task's failure is reported before the other parts are counted."""
    lost.worker(concurrency=1)  # the held child blocks the rest of the header
    result, ids = lost.send(victim=0)
    os.kill(lost.held(), signal.SIGKILL)
    assert_the_chord_agrees(lost, result, ids, victim=0)


def test_a_header_task_lost_after_the_others_returned_fails_the_body(lost: Lost) -> None:
    """The other parts complete the count, and return, while the killed task's part is
    counted but its SUCCESS not stored: nothing may publish the body yet."""
    lost.worker(concurrency=2)
    result, ids = lost.send(victim=1)
    pid = lost.held()
    lost.returned(ids[0], ids[2])
    os.kill(pid, signal.SIGKILL)
    assert_the_chord_agrees(lost, result, ids, victim=1)


# -- the protocol, step by step -------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["ordered", "arrival-order"])
def chords(request: Any, make_app: Any, r: redis.Redis) -> Iterator[Chords]:
    app = make_app(
        perkey_chord_claim_ttl=CLAIM_TTL,
        result_backend_transport_options={"result_chord_ordered": request.param},
    )
    harness = Chords(app, r)
    with running_worker(harness.app):
        yield harness


def counted(chords: Chords, gid: str, body: Any, index: int) -> Context:
    """Header task ``index`` counted, as just before its SUCCESS is stored; its worker
    dies there, so the store never happens."""
    request = chords.part(gid, body, index)
    chords.backend.chords.part_stored(request, states.SUCCESS, index + 1)
    return request


def test_a_failure_reported_after_the_part_was_counted_fails_the_body(chords: Chords) -> None:
    """What the worker's main process does for a task whose pool child was lost."""
    gid, body = chords.start()
    request = counted(chords, gid, body, 0)
    chords.backend.mark_as_failure(request.id, WorkerLostError("lost"), request=request)
    chords.returned(gid, body, 1)
    chords.returned(gid, body, 2)
    error = chords.result(body)
    assert isinstance(error, ChordError)
    assert f"{gid}-h0" in str(error)
    assert "WorkerLostError" in str(error)
    assert chords.claim(gid) == b"done"
    assert chords.runs == []


def test_the_body_waits_for_a_part_in_flight(chords: Chords) -> None:
    """The other parts complete the count while part 0 is in flight: none claims the
    body; part 0's failure, reported last, makes it fail."""
    gid, body = chords.start()
    request = counted(chords, gid, body, 0)
    chords.returned(gid, body, 1)
    chords.returned(gid, body, 2)
    waiting = chords.claim(gid)
    assert waiting is not None
    assert waiting.startswith(b"O|")  # complete, and nobody may claim it yet
    flight = chords.backend.layout.chord_keys(gid).flight
    assert chords.r.hget(flight, f"{gid}-h0:0") is not None
    swept = chords.backend.run_sweep(dry_run=True)  # the sweep knows the key
    assert (swept.by_class["unexpected"], swept.by_class["healthy"]) == (0, swept.scanned)
    chords.backend.mark_as_failure(request.id, WorkerLostError("lost"), request=request)
    error = chords.result(body)
    assert isinstance(error, ChordError)
    assert f"{gid}-h0" in str(error)
    assert chords.runs == []


def test_a_part_stored_but_never_reported_is_taken_from_its_store(chords: Chords) -> None:
    """Part 0's worker died after storing it (Celery acknowledges that task, and never
    reports it): the last reporter finds its result stored and runs the body at once."""
    gid, body = chords.start()
    chords.store(gid, body, 0)
    chords.returned(gid, body, 1)
    chords.returned(gid, body, 2)
    assert chords.result(body) == 6
    assert [sorted(run) for run in chords.runs] == [[1, 2, 3]]  # last when unordered
    assert chords.claim(gid) == b"done"


@pytest.mark.parametrize("by", ["reporter", "sweep"])
def test_a_part_in_flight_is_settled_with_what_its_task_stored(chords: Chords, by: str) -> None:
    """Counted as a SUCCESS, stored as a FAILURE: the store decides, whether the last
    reporter finds it or, past the claim's deadline, the sweep."""
    gid, body = chords.start()
    counted(chords, gid, body, 0)

    def fail() -> None:
        chords.backend.store_result(f"{gid}-h0", ValueError("stored failure"), states.FAILURE)

    if by == "reporter":
        fail()
    chords.returned(gid, body, 1)
    chords.returned(gid, body, 2)
    if by == "sweep":
        fail()
        wait_until(lambda: chords.stalled() == 1, "the claim's deadline")
        summary = chords.backend.run_sweep(chords_only=True)
        assert (summary.chords_failed, summary.chords_repaired) == (1, 0)
    error = chords.result(body)
    assert isinstance(error, ChordError)
    assert "stored failure" in str(error)
    assert chords.claim(gid) == b"done"
    assert chords.runs == []


def test_a_part_lost_in_flight_is_repaired_with_its_counted_value(chords: Chords) -> None:
    """Part 0's whole worker died before its store, and Celery had acknowledged it:
    nothing will report it or store anything. Past the claim's deadline the sweep runs
    the body with the value it was counted with, as before."""
    gid, body = chords.start()
    counted(chords, gid, body, 0)
    chords.returned(gid, body, 1)
    chords.returned(gid, body, 2)
    wait_until(lambda: chords.stalled() == 1, "the claim's deadline")
    assert chords.backend.run_sweep(chords_only=True).chords_repaired == 1
    assert chords.result(body) == 6
    assert [sorted(run) for run in chords.runs] == [[1, 2, 3]]  # last when unordered
    assert chords.r.keys(chords.backend.layout.chord(gid, "*")) == [
        chords.backend.layout.chord_keys(gid).claim.encode()
    ]
