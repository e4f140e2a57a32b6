"""The chord protocol's recovery paths, step by step, with an in-process worker running
the bodies: parts counted before their results are stored, claims with deadlines,
takeovers by redeliveries, and the sweep's repairs. tests/test_chord_crash.py kills real
worker processes at each step; here each step is driven directly, so every branch is
reached deterministically."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import chain, chord, group, states
from celery.app.task import Context
from celery.exceptions import ChordError

from celery_perkey_backend import ConfigurationError
from celery_perkey_backend.chords import body_task_ids
from celery_perkey_backend.prometheus import render, sweep_and_publish
from celery_perkey_backend.sweep import sweep
from celery_perkey_backend.testing import free_port

from .conftest import run_cli, running_worker, value

CLAIM_TTL = "300ms"


def wait(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Chords:
    """An app whose body task counts its runs, and helpers to drive a chord by hand."""

    def __init__(self, app: Any, r: redis.Redis) -> None:
        self.app = app
        self.r = r
        self.runs: list[Any] = []

        @app.task(shared=False, name="t.count")
        def count(values: list[Any]) -> Any:
            self.runs.append(values)
            return sum(values)

    @property
    def backend(self) -> Any:
        return self.app.backend

    def start(self, size: int = 3, body: Any = None) -> tuple[str, Any]:
        """A chord as Celery starts it: body kept, size set; no header task has run."""
        gid = f"g-{uuid.uuid4().hex[:8]}"
        body = body if body is not None else self.app.tasks["t.count"].s()
        body.freeze()
        header = [self.app.AsyncResult(f"{gid}-h{i}") for i in range(size)]
        self.backend.apply_chord((gid, header), body)
        self.backend.set_chord_size(gid, size)
        return gid, body

    def part(self, gid: str, body: Any, index: int) -> Context:
        return Context(id=f"{gid}-h{index}", group=gid, group_index=index, chord=body)

    def store(self, gid: str, body: Any, index: int, value: Any = None) -> None:
        """A header task's result stored (the part counts) but no on_chord_part_return:
        its worker died just after, and Celery acknowledged it."""
        value = index + 1 if value is None else value
        state = states.FAILURE if isinstance(value, Exception) else states.SUCCESS
        self.backend.store_result(
            f"{gid}-h{index}", value, state, request=self.part(gid, body, index)
        )

    def returned(self, gid: str, body: Any, index: int, value: Any = None) -> None:
        """A header task that returns normally: stored, then on_chord_part_return."""
        self.store(gid, body, index, value)
        self.backend.on_chord_part_return(
            self.part(gid, body, index), states.SUCCESS, index + 1 if value is None else value
        )

    def claim(self, gid: str) -> bytes | None:
        value: bytes | None = self.r.get(self.backend.layout.chord_keys(gid).claim)
        return value

    def stalled(self) -> int:
        count: int = self.backend.stats().chords_stalled
        return count

    def result(self, body: Any, timeout: float = 10) -> Any:
        return self.app.AsyncResult(body.id).get(timeout=timeout, propagate=False)


@pytest.fixture
def chords(make_app: Any, r: redis.Redis) -> Iterator[Chords]:
    harness = Chords(make_app(perkey_chord_claim_ttl=CLAIM_TTL), r)
    with running_worker(harness.app):
        yield harness


def test_a_part_counts_before_its_result_is_stored(chords: Chords) -> None:
    """Every header worker died after storing its result: the sweep runs the body."""
    gid, body = chords.start()
    for index in range(3):
        chords.store(gid, body, index)
    assert chords.claim(gid) is not None  # complete, waiting for a claimer
    assert chords.claim(gid) != b"done"
    summary = chords.backend.run_sweep(chords_only=True)
    assert summary.chords_stalled == 0  # not before the deadline
    wait(lambda: chords.stalled() == 1, "the claim's deadline")
    summary = chords.backend.run_sweep(chords_only=True)
    assert (summary.chords_stalled, summary.chords_repaired) == (1, 1)
    assert chords.result(body) == 6
    assert chords.claim(gid) == b"done"
    assert chords.r.keys(chords.backend.layout.chord(gid, "*")) == [
        chords.backend.layout.chord_keys(gid).claim.encode()
    ]
    assert chords.backend.run_sweep(chords_only=True).chords_stalled == 0
    assert chords.runs == [[1, 2, 3]]


@pytest.mark.parametrize("claim_ms", [60_000, 300])
def test_a_redelivery_takes_over_a_claim_past_its_deadline(chords: Chords, claim_ms: int) -> None:
    gid, body = chords.start()
    chords.returned(gid, body, 0)
    chords.returned(gid, body, 1)
    chords.store(gid, body, 2)
    # The last part's worker claims the body, then dies before publishing it.
    tally = chords.backend.store.chord_part(
        gid, f"{gid}-h2", b"", 2, 0, 0, claim_ms, "dead-claimer", take=True
    )
    assert tally.claimed
    claimed = chords.claim(gid)
    assert claimed is not None
    assert claimed.startswith(b"C|dead-claimer|")
    if claim_ms > 1000:
        # A redelivery while the claim lives leaves it alone.
        chords.backend.on_chord_part_return(chords.part(gid, body, 2), states.SUCCESS, 3)
        assert chords.claim(gid) == claimed
        assert chords.runs == []
        return
    wait(lambda: chords.stalled() == 1, "the claim's deadline")
    chords.backend.on_chord_part_return(chords.part(gid, body, 2), states.SUCCESS, 3)
    assert chords.result(body) == 6
    assert chords.claim(gid) == b"done"
    assert chords.runs == [[1, 2, 3]]


def _publishing(chords: Chords, gid: str, body: Any) -> None:
    """The last part's worker claimed, recorded "publishing", then died."""
    chords.returned(gid, body, 0)
    chords.returned(gid, body, 1)
    chords.store(gid, body, 2)
    store = chords.backend.store
    assert store.chord_part(gid, f"{gid}-h2", b"", 2, 0, 0, 300, "dead", take=True).claimed
    assert store.chord_publishing(gid, "dead", 300)
    assert chords.claim(gid).startswith(b"P|dead|")  # type: ignore[union-attr]


@pytest.mark.parametrize("by", ["redelivery", "sweep"])
def test_a_late_publisher_whose_body_ran_is_settled(chords: Chords, by: str) -> None:
    gid, body = chords.start()
    _publishing(chords, gid, body)
    # Its body went out and ran: it left its result.
    chords.backend.store_result(body.id, "ran already", states.SUCCESS)
    wait(lambda: chords.stalled() == 1, "the claim's deadline")
    if by == "sweep":
        summary = chords.backend.run_sweep(chords_only=True)
        assert (summary.chords_settled, summary.chords_repaired) == (1, 0)
    else:
        chords.backend.on_chord_part_return(chords.part(gid, body, 2), states.SUCCESS, 3)
    assert chords.claim(gid) == b"done"
    assert chords.result(body) == "ran already"
    assert chords.runs == []


def test_a_body_that_only_started_counts_as_published(chords: Chords) -> None:
    gid, body = chords.start()
    _publishing(chords, gid, body)
    chords.backend.store_result(body.id, {"pid": 1}, states.STARTED)
    wait(lambda: chords.stalled() == 1, "the claim's deadline")
    assert chords.backend.run_sweep(chords_only=True).chords_settled == 1
    assert chords.runs == []


@pytest.mark.parametrize("by", ["redelivery", "sweep"])
def test_a_late_publisher_whose_body_left_no_trace_is_published_again(
    chords: Chords, by: str
) -> None:
    gid, body = chords.start()
    _publishing(chords, gid, body)
    wait(lambda: chords.stalled() == 1, "the claim's deadline")
    if by == "sweep":
        assert chords.backend.run_sweep(chords_only=True).chords_repaired == 1
    else:
        chords.backend.on_chord_part_return(chords.part(gid, body, 2), states.SUCCESS, 3)
    assert chords.result(body) == 6
    assert chords.claim(gid) == b"done"
    assert chords.runs == [[1, 2, 3]]


def test_a_publisher_that_lost_its_claim_does_not_publish(chords: Chords) -> None:
    gid, body = chords.start()
    chords.returned(gid, body, 0)
    chords.returned(gid, body, 1)
    chords.store(gid, body, 2)
    store = chords.backend.store
    assert store.chord_part(gid, f"{gid}-h2", b"", 2, 0, 0, 300, "slow", take=True).claimed
    wait(lambda: chords.stalled() == 1, "the claim's deadline")
    assert chords.backend.run_sweep(chords_only=True).chords_repaired == 1
    # The slow claimer comes back: its claim is gone, so it must not publish.
    assert not store.chord_publishing(gid, "slow", 300)
    assert not store.chord_done(gid, "slow", 1000)
    assert chords.result(body) == 6
    assert chords.runs == [[1, 2, 3]]


def test_a_repair_that_cannot_build_the_arguments_fails_the_body(chords: Chords) -> None:
    gid, body = chords.start()
    chords.store(gid, body, 0)
    chords.store(gid, body, 1, ValueError("header broke"))
    chords.store(gid, body, 2)
    wait(lambda: chords.stalled() == 1, "the claim's deadline")
    summary = chords.backend.run_sweep(chords_only=True)
    assert (summary.chords_failed, summary.chords_repaired) == (1, 0)
    error = chords.result(body)
    assert isinstance(error, ChordError)
    assert "header broke" in str(error)
    assert chords.claim(gid) == b"done"


@pytest.mark.parametrize("kept", ["unencodable", "missing", "garbage"])
def test_a_repair_without_the_body_fails_the_chord(chords: Chords, kept: str) -> None:
    gid, body = chords.start()
    key = chords.backend.layout.chord_keys(gid).body
    if kept == "unencodable":  # what start() keeps when the serializer refused it
        chords.r.set(key, json.dumps({"id": body.id, "signature": None, "error": "TypeError()"}))
    elif kept == "missing":
        chords.r.delete(key)
    else:
        chords.r.set(key, b"\xff not json")
    for index in range(3):
        chords.store(gid, body, index)
    wait(lambda: chords.stalled() == 1, "the claim's deadline")
    summary = chords.backend.run_sweep(chords_only=True)
    assert (summary.chords_failed, summary.chords_repaired) == (1, 0)
    assert chords.claim(gid) == b"done"
    if kept == "unencodable":  # the body's id was kept: its waiter learns why
        error = chords.result(body)
        assert isinstance(error, ChordError)
        assert "could not be stored" in str(error)
    assert chords.runs == []


def test_a_body_the_serializer_cannot_carry_is_kept_by_id(chords: Chords) -> None:
    gid, body = chords.start(body=chords.app.tasks["t.count"].s().set(headers={"x": object()}))
    kept = json.loads(chords.r.get(chords.backend.layout.chord_keys(gid).body) or b"{}")
    assert kept["id"] == body.id
    assert kept["signature"] is None
    assert "object" in kept["error"]


def test_a_stalled_publishing_chord_without_its_body_is_failed(chords: Chords) -> None:
    gid, body = chords.start()
    chords.r.delete(chords.backend.layout.chord_keys(gid).body)
    _publishing(chords, gid, body)
    wait(lambda: chords.stalled() == 1, "the claim's deadline")
    assert chords.backend.run_sweep(chords_only=True).chords_failed == 1
    assert chords.claim(gid) == b"done"


def test_the_failing_header_is_reported_when_a_succeeding_part_claims(chords: Chords) -> None:
    """The claimer is the header task that succeeded, with no exception in flight."""
    app = chords.app
    header = [app.tasks["t.fail"].s("header broke"), app.tasks["t.sleep"].s(0.3, 1)]
    result = chord(header)(app.tasks["t.count"].s())
    error = result.get(timeout=10, propagate=False)
    assert isinstance(error, ChordError)
    assert "header broke" in str(error)


def test_a_dry_run_lists_stalled_chords_and_changes_nothing(chords: Chords) -> None:
    gid, body = chords.start()
    for index in range(3):
        chords.store(gid, body, index)
    wait(lambda: chords.stalled() == 1, "the claim's deadline")
    before = chords.claim(gid)
    planned = chords.backend.run_sweep(dry_run=True)
    claim_key = chords.backend.layout.chord_keys(gid).claim
    assert planned.chords_stalled == 1
    assert ("repair", claim_key) in planned.planned
    assert "chords stalled=1 in" in planned.line()
    assert chords.claim(gid) == before
    dry = run_cli(chords.app, "sweep", "--dry-run", "--chords-only")
    assert dry.exit_code == 0, dry.output
    assert f"would repair the chord of {claim_key}" in dry.stdout
    assert "chords stalled=1" in dry.stdout
    assert "chords stalled" in run_cli(chords.app, "stats").stdout
    assert json.loads(run_cli(chords.app, "stats", "--json").stdout)["chords_stalled"] == 1
    done = run_cli(chords.app, "sweep", "--chords-only")
    assert done.exit_code == 0, done.output
    assert "repaired=1 settled=0 failed=0" in done.stdout
    assert chords.result(body) == 6


def test_a_chords_only_sweep_leaves_other_keys_alone(make_app: Any, r: redis.Redis) -> None:
    app = make_app(result_expires=None)
    app.backend.store_result("t1", 1, states.SUCCESS)
    gid = "g-only"
    app.backend.set_chord_size(gid, 2)
    summary = app.backend.run_sweep(chords_only=True)
    assert summary.scanned == 0  # neither the result nor the size key is a claim key
    assert r.ttl(app.backend.layout.result("t1")) == -1
    assert summary.by_class["no_ttl"] == 0
    assert app.backend.run_sweep().by_class["no_ttl"] == 2


def test_the_store_level_sweep_only_counts_stalled_chords(chords: Chords, make_app: Any) -> None:
    gid, body = chords.start()
    for index in range(3):
        chords.store(gid, body, index)
    wait(lambda: chords.stalled() == 1, "the claim's deadline")
    summary = sweep(chords.backend.store, chords_only=True)  # no repair hook
    assert (summary.chords_stalled, summary.chords_repaired) == (1, 0)
    assert chords.claim(gid) != b"done"
    # The same sweep through a backend that exports to Prometheus: counted in Redis.
    exporting = make_app(perkey_prometheus_port=free_port()).backend.store
    sweep_and_publish(exporting, repair=chords.backend.chords.repair, chords_only=True)
    shown = render(exporting).decode()
    assert value(shown, "perkey_sweep_chords_total", outcome="repaired") == 1
    assert value(shown, "perkey_chords_stalled") == 0


def test_body_task_ids(app: Any) -> None:
    add, echo = app.tasks["t.add"], app.tasks["t.echo"]
    plain = echo.s().set(task_id="b1")
    assert body_task_ids(plain) == ["b1"]
    assert body_task_ids(echo.s()) == []
    both = group(echo.s().set(task_id="g1"), echo.s().set(task_id="g2"))
    assert body_task_ids(both) == ["g1", "g2"]
    steps = chain(echo.s().set(task_id="c1"), echo.s().set(task_id="c2"))
    assert body_task_ids(steps) == ["c1"]
    assert body_task_ids(chain()) == []
    inner = chord([add.s(1, 1).set(task_id="h1"), add.s(2, 2).set(task_id="h2")], echo.s())
    assert body_task_ids(inner) == ["h1", "h2"]
    assert body_task_ids(dict(both)) == ["g1", "g2"]


def test_the_claim_ttl_setting(make_app: Any) -> None:
    assert make_app(perkey_chord_claim_ttl="90s").backend.settings.chord_claim_ttl_s == 90.0
    assert make_app().backend.settings.chord_claim_ttl_s == 60.0
    with pytest.raises(ConfigurationError, match="perkey_chord_claim_ttl"):
        _ = make_app(perkey_chord_claim_ttl=0).backend


def test_apply_chord_keeps_the_body(app: Any, r: redis.Redis, tmp_path: Path) -> None:
    body = app.tasks["t.echo"].s()
    body.freeze()
    app.backend.apply_chord(("g-kept", [app.AsyncResult("x")]), body)
    kept = app.backend.decode(r.get(app.backend.layout.chord_keys("g-kept").body))
    assert kept["id"] == body.id
    assert kept["signature"]["task"] == "t.echo"
    assert r.pttl(app.backend.layout.chord_keys("g-kept").body) > 0


def test_a_body_that_cannot_be_published_fails_with_a_chord_error(chords: Chords) -> None:
    body = chords.app.tasks["t.count"].s().set(countdown="not a number")
    gid, body = chords.start(body=body)
    for index in range(3):
        chords.returned(gid, body, index)
    error = chords.result(body)
    assert isinstance(error, ChordError)
    assert "Join error" in str(error)
    assert chords.claim(gid) == b"done"
    assert chords.runs == []


def test_a_repair_of_a_chord_that_is_not_stalled_does_nothing(chords: Chords) -> None:
    gid, body = chords.start()
    assert chords.backend.chords.repair(gid) == "skipped"  # incomplete
    for index in range(3):
        chords.returned(gid, body, index)
    assert chords.result(body) == 6
    assert chords.backend.chords.repair(gid) == "skipped"  # done
    assert chords.runs == [[1, 2, 3]]
