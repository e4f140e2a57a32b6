"""A multiplexer's registrations live as long as its waits, and it lives no longer than
it is used: it stops when idle or closed, and a later wait starts another.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import redis
from celery import states

from celery_perkey_backend import BackendUnavailableError, aio, multiplex
from celery_perkey_backend.testing import EmbeddedServer

from .conftest import Waiting, wait_until


def _app(make_app: Any, srv: EmbeddedServer, name: str = "mux", **conf: Any) -> Any:
    return make_app(
        backend=f"perkey://127.0.0.1:{srv.port}/0",
        perkey_multiplex=True,
        redis_client_name=name,
        **conf,
    )


def _threads(mux: multiplex.Multiplexer) -> list[threading.Thread]:
    return [
        t for t in threading.enumerate() if t.name.startswith("perkey-") and mux.inbox in t.name
    ]


def _clients(client: redis.Redis, name: str) -> int:
    return len([c for c in client.client_list() if c["name"] == name])


# -- registrations ------------------------------------------------------------------------


def test_a_registration_is_renewed_while_its_wait_lasts(
    make_app: Any, own: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(multiplex, "REGISTRATION_TTL_MS", 2000)
    monkeypatch.setattr(multiplex, "RENEW_AFTER", 0.5, raising=False)
    monkeypatch.setattr(multiplex, "CHECK_INTERVAL", 0.3)
    app = _app(make_app, own)
    client = redis.Redis(port=own.port)
    watchers = app.backend.layout.watchers("t1")
    waiting = Waiting(lambda: app.AsyncResult("t1").get(timeout=30))
    wait_until(lambda: client.exists(watchers), "the wait is registered")
    # Three registration lifetimes: never gone, never near its end.
    lowest = 2000
    end = time.monotonic() + 6.0
    while time.monotonic() < end:
        lowest = min(lowest, client.pttl(watchers))
        time.sleep(0.02)
    assert lowest > 500
    app.backend.store_result("t1", "kept", states.SUCCESS)
    assert waiting.result() == "kept"


def test_forget_leaves_other_waits_registered(make_app: Any, own: EmbeddedServer) -> None:
    waiter = _app(make_app, own, name="waiter")
    other = _app(make_app, own, name="other")  # another client: another multiplexer
    client = redis.Redis(port=own.port)
    watchers = waiter.backend.layout.watchers("t1")
    waiting = Waiting(lambda: waiter.AsyncResult("t1").get(timeout=30))
    wait_until(lambda: client.exists(watchers), "the wait is registered")
    other.backend.store_result("t1", {"step": 1}, "PROGRESS")
    other.AsyncResult("t1").forget()
    assert client.smembers(watchers) == {waiter.backend.waiter.mux.inbox.encode()}
    other.backend.store_result("t1", "after the forget", states.SUCCESS)
    # Well before a check (every 5 s) could have found it.
    assert waiting.result(timeout=2) == "after the forget"


# -- stopping -----------------------------------------------------------------------------


def test_an_idle_multiplexer_stops_and_a_new_wait_starts_another(
    make_app: Any, own: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(multiplex, "IDLE_STOP", 0.5, raising=False)
    client = redis.Redis(port=own.port)
    apps = [_app(make_app, own, name=f"idle{i}") for i in range(5)]
    muxes = []
    for i, app in enumerate(apps):
        app.backend.store_result(f"t{i}", i, states.SUCCESS)
        assert app.AsyncResult(f"t{i}").get(timeout=5) == i
        muxes.append(app.backend.waiter.mux)
    assert len({mux.inbox for mux in muxes}) == 5
    for i, mux in enumerate(muxes):
        wait_until(lambda mux=mux: mux.stopped and not _threads(mux), "its threads end")
        wait_until(lambda i=i: _clients(client, f"idle{i}") == 0, "its connections close")
        assert mux not in multiplex._multiplexers.values()
    # A wait after the stop is served by a new multiplexer, transparently.
    assert apps[0].AsyncResult("t0").get(timeout=5) == 0
    assert asyncio.run(aio.wait(apps[1].AsyncResult("t1"), timeout=5)) == 1
    assert not apps[0].backend.waiter.mux.stopped


def test_closing_the_backend_stops_its_multiplexer(make_app: Any, own: EmbeddedServer) -> None:
    app = _app(make_app, own, name="closed")
    client = redis.Redis(port=own.port)
    waiting = Waiting(lambda: app.AsyncResult("t1").get(timeout=30))
    wait_until(lambda: client.exists(app.backend.layout.watchers("t1")), "the wait is registered")
    mux = app.backend.waiter.mux
    assert _threads(mux)
    app.backend.close()
    assert isinstance(waiting.result(), BackendUnavailableError)
    wait_until(lambda: not _threads(mux), "its threads end")
    wait_until(lambda: _clients(client, "closed") == 0, "its connections close")
    assert not client.exists(app.backend.layout.watchers("t1"))
    assert not client.exists(mux.inbox)
    # The backend works on.
    app.backend.store_result("t2", "again", states.SUCCESS)
    assert app.AsyncResult("t2").get(timeout=5) == "again"


def test_waits_of_a_loop_closed_by_hand_are_released(
    make_app: Any, own: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(multiplex, "CHECK_INTERVAL", 0.3)
    app = _app(make_app, own)
    client = redis.Redis(port=own.port)
    mux = app.backend.waiter.mux
    loop = asyncio.new_event_loop()
    task = loop.create_task(aio.wait(app.AsyncResult("never"), timeout=60))
    loop.run_until_complete(asyncio.sleep(0.01))
    wait_until(lambda: mux.waits == 1, "the wait began")
    loop.close()  # the coroutine never finishes
    wait_until(lambda: mux.waits == 0, "the wait is released")
    watchers = app.backend.layout.watchers("never")
    wait_until(lambda: not client.exists(watchers), "its registration is gone")
    assert not task.done()


_EXITING = """
import logging, sys, threading, time
from celery import Celery
logging.basicConfig(level=logging.WARNING)
app = Celery("exiting", backend=sys.argv[1], set_as_current=False)
app.conf.perkey_multiplex = True
app.conf.redis_client_name = "exiting"
app.backend.store_result("t1", "done", "SUCCESS")
print(app.AsyncResult("t1").get(timeout=10), flush=True)
mux = app.backend.waiter.mux
if sys.argv[2] == "waiting":
    wait = lambda: app.AsyncResult("t2").get(timeout=30)
    threading.Thread(target=wait, daemon=True).start()
    while not mux.waits:
        time.sleep(0.01)
else:
    # The test cuts the connections while the reader still blocks; exit once it saw.
    sys.stdin.readline()
    end = time.monotonic() + 10
    while not mux.outage.failures and time.monotonic() < end:
        time.sleep(0.01)
    print(mux.outage.failures, flush=True)
"""


@pytest.mark.parametrize("state", ["idle", "waiting"])
def test_a_process_that_stops_logs_nothing_alarming(own: EmbeddedServer, state: str) -> None:
    """Idle: its last wait ended, and its connection is lost during the reader's last
    block. Waiting: it exits with a wait still running."""
    url = f"perkey://127.0.0.1:{own.port}/0"
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXITING, url, state],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "done"
    if state == "idle":
        redis.Redis(port=own.port).client_kill_filter(_type="normal", skipme=True)
        proc.stdin.write("go\n")
        proc.stdin.flush()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    if state == "idle":
        assert out.strip() != "0", "the reader never saw its connection go"
    assert "WARNING" not in err, err
