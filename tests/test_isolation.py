"""A fault that belongs to one wait fails that wait alone.

Waits on 100 healthy tasks share a multiplexer with one poisoned wait: an id no key can
be made of, a key of the wrong type written by hand, a malformed notification pushed
into the inbox. Every healthy wait gets its result; the poisoned one fails with an
error that names its task and key. Then the background reads: after a black hole heals,
waits work again within about one step of the registrar.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import states
from celery.exceptions import TimeoutError

from celery_perkey_backend import aio
from celery_perkey_backend.errors import InvalidIdError, StoreCommandError
from celery_perkey_backend.store import parse_note
from celery_perkey_backend.testing import EmbeddedServer

from .conftest import wait_until
from .netproxy import Proxy

HEALTHY = [f"ok{i}" for i in range(100)]


def _app(make_app: Any, port: int, **conf: Any) -> Any:
    return make_app(backend=f"perkey://127.0.0.1:{port}/0", perkey_multiplex=True, **conf)


#: The key each wrong-type poison spoils, by its name.
SPOILED = {"result key": "result", "state key": "state", "watchers key": "watchers"}


def _wrong_type(kind: str) -> Callable[[Any, redis.Redis], str]:
    def poison(app: Any, client: redis.Redis) -> str:
        key = getattr(app.backend.layout, kind)("bad")
        if kind == "state":
            client.rpush(key, "a list where a string belongs")
        else:
            client.set(key, "written by hand")
        return "bad"

    return poison


def _bad_note(note: bytes) -> Callable[[Any, redis.Redis], str]:
    def poison(app: Any, client: redis.Redis) -> str:
        client.rpush(app.backend.waiter.mux.inbox, note)
        return "quiet"  # its wait is healthy; the notification is the poison

    return poison


def _inbox_of_another_type(app: Any, client: redis.Redis) -> str:
    client.set(app.backend.waiter.mux.inbox, "written by hand")
    return "quiet"


#: Each poison: what it does before the waits start, and the id of the poisoned wait.
POISONS: dict[str, Callable[[Any, redis.Redis], str]] = {
    "empty id": lambda app, client: "",
    "lone surrogate": lambda app, client: "\ud800",
    "result key of another type": _wrong_type("result"),
    "state key of another type": _wrong_type("state"),
    "watchers key of another type": _wrong_type("watchers"),
    "note of length 0": _bad_note(b"R0:ok1S1|x"),
    "note of negative length": _bad_note(b"R-1:ok1S1|x"),
    "inbox of another type": _inbox_of_another_type,
}


def _wait_all(app: Any, ids: list[str], mode: str, timeout: float) -> list[Any]:
    """Wait on every id at once, in one process; each outcome, value or error."""
    if mode == "aio":

        async def waits() -> list[Any]:
            return await asyncio.gather(
                *(aio.wait(app.AsyncResult(tid), timeout=timeout) for tid in ids),
                return_exceptions=True,
            )

        return asyncio.run(waits())
    outcomes: list[Any] = [None] * len(ids)

    def one(i: int) -> None:
        try:
            outcomes[i] = app.AsyncResult(ids[i]).get(timeout=timeout)
        except Exception as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ids))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


@pytest.mark.parametrize("mode", ["sync", "aio"])
@pytest.mark.parametrize("poison", list(POISONS))
def test_one_poisoned_wait_fails_alone(
    make_app: Any,
    own: EmbeddedServer,
    fast_checks: None,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    poison: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_perkey_backend")
    app = _app(make_app, own.port)
    client = redis.Redis(port=own.port)
    bad = POISONS[poison](app, client)
    ids = [*HEALTHY, bad]
    outcome: list[list[Any]] = []
    waiting = threading.Thread(target=lambda: outcome.append(_wait_all(app, ids, mode, 30)))
    waiting.start()
    layout = app.backend.layout
    wait_until(
        lambda: all(client.exists(layout.watchers(tid)) for tid in HEALTHY),
        "every healthy wait is registered",
    )

    # A full check has read the poisoned task with the others in one batch.
    def checked() -> int:
        stats: dict[str, Any] = client.info("commandstats")
        return int(stats.get("cmdstat_sismember", {}).get("calls", 0))

    before = checked()
    wait_until(lambda: checked() >= before + 101, "a check ran with every wait in it")
    inbox = app.backend.waiter.mux.inbox
    wait_until(lambda: client.type(inbox) != b"string", "the inbox is a list again")
    for i, tid in enumerate(HEALTHY):
        app.backend.store_result(tid, i, states.SUCCESS)
    if bad == "quiet":
        app.backend.store_result(bad, "quiet too", states.SUCCESS)
    waiting.join(60)
    assert outcome, "the waits did not end"
    got = outcome[0]
    assert got[:100] == list(range(100))
    if bad == "quiet":
        assert got[100] == "quiet too"
        said = "replaced inbox" if "inbox" in poison else "ignored a malformed notification"
        assert said in caplog.text
    elif bad == "bad":
        error = got[100]
        assert isinstance(error, StoreCommandError), error
        assert "'bad'" in str(error)
        kind = next(kind for name, kind in SPOILED.items() if poison.startswith(name))
        key = getattr(layout, kind)("bad")
        assert repr(key) in str(error)
    else:
        assert isinstance(got[100], InvalidIdError), got[100]
        assert repr(bad) in str(got[100])


@pytest.mark.parametrize(
    "raw",
    [b"", b"R", b"R:", b"R0:", b"R0:abc", b"R-1:abc", b"R+1:abc", b"R 1:abc", b"R1_0:abc",
     b"Rx:abc", b"X3:abc", b"R3:abc", b"r3:abcd", b"R3:ab", b"r2:\xed\xa0", b"R1:\xffS1|x"],
)  # fmt: skip
def test_malformed_notifications_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_note(raw)


def test_well_formed_notifications_are_read() -> None:
    assert parse_note(b"R3:abcS1|x") == ("abc", True, b"S1|x")
    assert parse_note(b"p3:abc") == ("abc", False, None)
    assert parse_note("r2:é".encode()) == ("é", True, None)


# -- every background read is bounded ---------------------------------------------------

#: How long after the heal a wait may take: the promise is 1 s; the rest is room for a
#: loaded test machine.
HEAL_BOUND = 1.0 + 0.5


def test_waits_work_again_right_after_a_black_hole_heals(
    make_app: Any, server: EmbeddedServer, r: redis.Redis
) -> None:
    """Settings are Celery's defaults (a 120 s socket timeout): a registrar waiting for a
    reply lost in the hole would hold every registration that long."""
    proxy = Proxy(server.port)
    try:
        app = _app(make_app, proxy.port)
        app.backend.store_result("sync", "found", states.SUCCESS)
        app.backend.store_result("aio", "found too", states.SUCCESS)
        early = threading.Thread(target=_ignore(lambda: app.AsyncResult("early").get(timeout=30)))
        early.start()
        wait_until(lambda: r.exists(app.backend.layout.watchers("early")), "a wait is registered")
        proxy.blackholed = True
        # A wait that begins in the hole: its registration's reply is lost there.
        late = threading.Thread(target=_ignore(lambda: app.AsyncResult("late").get(timeout=3)))
        late.start()
        time.sleep(5)  # the length of the outage
        proxy.blackholed = False
        healed = time.monotonic()
        assert app.AsyncResult("sync").get(timeout=10) == "found"
        assert time.monotonic() - healed < HEAL_BOUND
        assert asyncio.run(aio.wait(app.AsyncResult("aio"), timeout=10)) == "found too"
        assert time.monotonic() - healed < HEAL_BOUND
        app.backend.store_result("early", 1, states.SUCCESS)
        early.join(30)
        late.join(30)
    finally:
        proxy.close()


def test_a_lost_reply_is_warned_about_once(
    make_app: Any, server: EmbeddedServer, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = Proxy(server.port)
    try:
        app = _app(make_app, proxy.port)
        waiting = threading.Thread(target=_ignore(lambda: app.AsyncResult("t1").get(timeout=30)))
        waiting.start()
        wait_until(lambda: r.exists(app.backend.layout.watchers("t1")), "the wait is registered")
        with caplog.at_level(logging.WARNING, logger="celery_perkey_backend"):
            proxy.blackholed = True
            # New waits make the registrar send into the hole, again and again.
            for i in range(3):
                with pytest.raises(TimeoutError):
                    app.AsyncResult(f"lost{i}").get(timeout=1)
            proxy.blackholed = False
            app.backend.store_result("t1", "after", states.SUCCESS)
            waiting.join(30)
        lost = [rec for rec in caplog.records if "lost their connection" in rec.getMessage()]
        assert len(lost) == 1
    finally:
        proxy.close()


def _ignore(call: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        with contextlib.suppress(Exception):
            call()

    return run
