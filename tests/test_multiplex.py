"""Many waits on a handful of connections: the multiplexed sync get() and asyncio waits.

Every case runs for both ways of waiting through the process's multiplexer: a plain
``get()`` with ``perkey_multiplex=True``, and ``await aio.wait()``. Lost notifications
are made for real: a notification never pushed (its storing process SIGKILLed between
its store and its push), a registration deleted, the reader's connection killed with
``CLIENT KILL`` and its inbox deleted meanwhile, the server restarted.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import pytest
import redis
from celery import states
from celery.exceptions import TimeoutError

from celery_perkey_backend import aio, scripts
from celery_perkey_backend.store import INLINE_MAX
from celery_perkey_backend.testing import EmbeddedServer

from .conftest import Waiting, wait_until

MODES = ["sync", "aio"]


def _get(app: Any, task_id: str, mode: str, timeout: float, **kwargs: Any) -> Any:
    result = app.AsyncResult(task_id)
    if mode == "sync":
        return result.get(timeout=timeout, **kwargs)
    return asyncio.run(aio.wait(result, timeout=timeout, **kwargs))


def _app(make_app: Any, srv: EmbeddedServer, **conf: Any) -> Any:
    return make_app(backend=f"perkey://127.0.0.1:{srv.port}/0", perkey_multiplex=True, **conf)


def _registered(app: Any, client: redis.Redis, task_id: str, count: int = 1) -> None:
    watchers = app.backend.layout.watchers(task_id)
    wait_until(lambda: client.scard(watchers) >= count, f"{count} inboxes wait on {task_id}")


def _waiting_on_t1(
    make_app: Any, own: EmbeddedServer, mode: str
) -> tuple[Any, redis.Redis, Waiting]:
    """A multiplexing app, a plain client, and a wait on ``t1`` already registered."""
    app = _app(make_app, own)
    client = redis.Redis(port=own.port)
    waiting = Waiting(lambda: _get(app, "t1", mode, 30))
    _registered(app, client, "t1")
    return app, client, waiting


@pytest.mark.parametrize("mode", MODES)
def test_a_result_stored_before_the_wait(make_app: Any, own: Any, mode: str) -> None:
    app = _app(make_app, own)
    app.backend.store_result("t1", "before", states.SUCCESS)
    assert _get(app, "t1", mode, 5) == "before"


@pytest.mark.parametrize("mode", MODES)
def test_a_result_stored_after_the_registration(make_app: Any, own: Any, mode: str) -> None:
    app, client, waiting = _waiting_on_t1(make_app, own, mode)
    app.backend.store_result("t1", "after", states.SUCCESS)
    assert waiting.result() == "after"
    # A ready store ends the registration; the finished wait leaves no watcher behind.
    assert not client.exists(app.backend.layout.watchers("t1"))


@pytest.mark.parametrize("mode", MODES)
def test_an_intermediate_state_never_ends_a_wait(make_app: Any, own: Any, mode: str) -> None:
    app = _app(make_app, own)
    client = redis.Redis(port=own.port)
    app.backend.store_result("t1", {"pid": 1}, states.STARTED)  # there at registration
    waiting = Waiting(lambda: _get(app, "t1", mode, 30))
    _registered(app, client, "t1")
    app.backend.store_result("t1", {"step": 1}, "PROGRESS")  # and notified
    app.backend.store_result("t1", "done", states.SUCCESS)
    assert waiting.result() == "done"


def test_a_large_result_is_read_rather_than_carried(make_app: Any, own: Any) -> None:
    app = _app(make_app, own)
    client = redis.Redis(port=own.port)
    waiting = Waiting(lambda: _get(app, "big", "sync", 30))
    _registered(app, client, "big")
    value = "x" * (3 * INLINE_MAX)
    app.backend.store_result("big", value, states.SUCCESS)
    assert waiting.result() == value


_OTHER_PROCESS = """
import asyncio, sys
from celery import Celery
from celery_perkey_backend import aio
app = Celery("other", backend=sys.argv[1], set_as_current=False)
app.conf.perkey_multiplex = sys.argv[3] == "sync"
result = app.AsyncResult(sys.argv[2])
if sys.argv[3] == "aio":
    print(repr(asyncio.run(aio.wait(result, timeout=30))))
else:
    print(repr(result.get(timeout=30)))
"""


def test_many_processes_wait_on_one_id(make_app: Any, own: Any) -> None:
    app = _app(make_app, own)
    client = redis.Redis(port=own.port)
    url = f"perkey://127.0.0.1:{own.port}/0"
    others = [
        subprocess.Popen(
            [sys.executable, "-c", _OTHER_PROCESS, url, "t1", mode],
            stdout=subprocess.PIPE,
            text=True,
        )
        for mode in ("aio", "sync", "per-connection")
    ]
    here = [
        Waiting(lambda mode=mode: _get(app, "t1", mode, 30)) for mode in MODES for _ in range(3)
    ]
    # This process and the two multiplexed others; the per-connection one blocks.
    _registered(app, client, "t1", 3)
    wait_until(lambda: client.info("clients")["blocked_clients"] >= 3, "all are waiting")
    app.backend.store_result("t1", "shared", states.SUCCESS)
    assert [waiting.result() for waiting in here] == ["shared"] * 6
    for proc in others:
        out, _ = proc.communicate(timeout=30)
        assert out.strip() == "'shared'"


@pytest.mark.parametrize("mode", MODES)
def test_read_once_hands_the_result_to_one_wait(make_app: Any, own: Any, mode: str) -> None:
    app = _app(make_app, own, perkey_read_once=True)
    client = redis.Redis(port=own.port)
    waits = [Waiting(lambda: _get(app, "t1", mode, 2)) for _ in range(3)]
    wait_until(lambda: app.backend.waiter.mux.waits >= 3, "three waits started")
    _registered(app, client, "t1")
    app.backend.store_result("t1", "once", states.SUCCESS)
    outcomes = [waiting.result() for waiting in waits]
    assert outcomes.count("once") == 1
    assert sum(isinstance(o, TimeoutError) for o in outcomes) == 2
    # The result went with the take; the two waits that timed out are unregistered by
    # the multiplexer's next turn, after they returned.
    wait_until(lambda: client.dbsize() == 0, "nothing left behind")


_STORE_THEN_DIE = """
import os, signal, sys
import redis
from celery import Celery
from celery_perkey_backend import scripts
app = Celery("worker", backend=sys.argv[1], set_as_current=False)
backend = app.backend
layout = backend.layout
payload = backend.encode({"status": "SUCCESS", "result": "stored, never notified",
                          "task_id": sys.argv[2], "traceback": None, "children": []})
keys, args = scripts.STORE.bind(
    {"result": layout.result(sys.argv[2]), "state": layout.state(sys.argv[2]),
     "watchers": layout.watchers(sys.argv[2])},
    {"letter": "S", "payload": payload, "ttl_ms": 60000, "task_id": sys.argv[2],
     "push": "0", "inline_max": 4096, "inbox_ttl_ms": 60000,
     "inbox_prefix": layout.inbox_prefix},
)
reply = redis.Redis.from_url(sys.argv[3]).eval(scripts.STORE.source, len(keys), *keys, *args)
assert len(reply) > 3, reply  # stored; the notification is the caller's to push...
os.kill(os.getpid(), signal.SIGKILL)  # ...and the caller dies first
"""


@pytest.mark.parametrize("mode", MODES)
def test_a_notification_never_pushed(make_app: Any, own: Any, fast_checks: None, mode: str) -> None:
    """As on a cluster, where the storing process pushes notifications itself: it is
    SIGKILLed between its store and its push. The check finds the result."""
    _, _, waiting = _waiting_on_t1(make_app, own, mode)
    url = f"perkey://127.0.0.1:{own.port}/0"
    killed = subprocess.run(
        [sys.executable, "-c", _STORE_THEN_DIE, url, "t1", f"redis://127.0.0.1:{own.port}/0"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    assert waiting.result() == "stored, never notified"


@pytest.mark.parametrize("mode", MODES)
def test_a_registration_deleted(make_app: Any, own: Any, fast_checks: None, mode: str) -> None:
    """The registration goes (evicted, say) and the result is stored in the same step,
    so no notification is sent: the check reads it."""
    app, client, waiting = _waiting_on_t1(make_app, own, mode)
    layout = app.backend.layout
    payload = app.backend.encode(
        {"status": "SUCCESS", "result": "read, not notified", "task_id": "t1",
         "traceback": None, "children": []}
    )  # fmt: skip
    keys, args = scripts.STORE.bind(
        {"result": layout.result("t1"), "state": layout.state("t1"),
         "watchers": layout.watchers("t1")},
        {"letter": "S", "payload": payload, "ttl_ms": 60000, "task_id": "t1", "push": "1",
         "inline_max": INLINE_MAX, "inbox_ttl_ms": 60000, "inbox_prefix": layout.inbox_prefix},
    )  # fmt: skip
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(layout.watchers("t1"))
        pipe.eval(scripts.STORE.source, len(keys), *keys, *args)
        assert pipe.execute()[1] == [1, 0, 0]  # stored, and nobody to notify
    assert waiting.result() == "read, not notified"


@pytest.mark.parametrize("mode", MODES)
def test_a_lost_registration_is_made_again(
    make_app: Any, own: Any, fast_checks: None, mode: str
) -> None:
    app, client, waiting = _waiting_on_t1(make_app, own, mode)
    client.delete(app.backend.layout.watchers("t1"))
    _registered(app, client, "t1")  # the check registers again...
    app.backend.store_result("t1", "notified again", states.SUCCESS)  # ...and it is notified
    assert waiting.result() == "notified again"


def _reader(client: redis.Redis) -> dict[str, Any] | None:
    for entry in client.client_list():
        if entry["cmd"] == "blpop":
            return entry
    return None


@pytest.mark.parametrize("mode", MODES)
def test_the_readers_connection_killed_and_its_inbox_deleted(
    make_app: Any, own: Any, fast_checks: None, mode: str
) -> None:
    app, client, waiting = _waiting_on_t1(make_app, own, mode)
    wait_until(lambda: _reader(client) is not None, "the reader blocks on its inbox")
    reader = _reader(client)
    assert reader is not None
    client.client_kill_filter(_id=reader["id"])
    app.backend.store_result("t1", "after the kill", states.SUCCESS)
    client.delete(app.backend.waiter.mux.inbox)  # whatever was in it is lost
    assert waiting.result() == "after the kill"


@pytest.mark.parametrize("mode", MODES)
def test_a_server_restart(make_app: Any, fast_checks: None, mode: str) -> None:
    first = EmbeddedServer().start()
    app = _app(make_app, first)
    client = redis.Redis(port=first.port)
    waiting = Waiting(lambda: _get(app, "t1", mode, 60))
    _registered(app, client, "t1")
    first.stop()
    second = EmbeddedServer(port=first.port).start()
    try:
        # Nothing persisted: the registration is gone, and comes back.
        _registered(app, redis.Redis(port=second.port), "t1")
        app.backend.store_result("t1", "after the restart", states.SUCCESS)
        assert waiting.result() == "after the restart"
    finally:
        second.stop()


def test_intermediate_states_arrive_in_order(make_app: Any, own: Any) -> None:
    app = _app(make_app, own)
    client = redis.Redis(port=own.port)
    seen: list[Any] = []
    waiting = Waiting(
        lambda: app.AsyncResult("t1").get(timeout=30, on_message=lambda m: seen.append(m["result"]))
    )
    _registered(app, client, "t1")
    for step in range(20):
        app.backend.store_result("t1", {"step": step}, "PROGRESS")
    app.backend.store_result("t1", "done", states.SUCCESS)
    assert waiting.result() == "done"
    assert seen == [None, *({"step": step} for step in range(20)), "done"]


def test_two_waits_on_one_task_see_each_state_once(make_app: Any, own: Any) -> None:
    app = _app(make_app, own)
    client = redis.Redis(port=own.port)
    app.backend.store_result("t1", {"step": 0}, "PROGRESS")
    seen: list[list[Any]] = [[], []]

    def follow(index: int) -> Any:
        return app.AsyncResult("t1").get(
            timeout=30, on_message=lambda meta: seen[index].append(meta["result"])
        )

    first = Waiting(lambda: follow(0))
    wait_until(lambda: seen[0] == [{"step": 0}], "the first wait saw the state")
    second = Waiting(lambda: follow(1))  # registers the task again
    wait_until(lambda: seen[1] == [{"step": 0}], "the second wait saw the state")
    _registered(app, client, "t1")
    app.backend.store_result("t1", "done", states.SUCCESS)
    assert (first.result(), second.result()) == ("done", "done")
    assert seen == [[{"step": 0}, "done"]] * 2


def test_threads_share_a_handful_of_connections(make_app: Any, own: Any) -> None:
    app = _app(make_app, own, redis_client_name="multiplexed")
    client = redis.Redis(port=own.port)
    waits = [Waiting(lambda i=i: _get(app, f"t{i}", "sync", 60)) for i in range(300)]
    wait_until(lambda: app.backend.waiter.mux.waits == 300, "every wait started")
    held = [c for c in client.client_list() if c["name"] == "multiplexed"]
    for i in range(300):
        app.backend.store_result(f"t{i}", i, states.SUCCESS)
    assert [waiting.result() for waiting in waits] == list(range(300))
    assert len(held) <= 8


def test_cancelled_waits_leave_nothing_behind(make_app: Any, own: Any) -> None:
    app = _app(make_app, own, redis_client_name="cancelled")
    client = redis.Redis(port=own.port)

    async def cancel_many() -> None:
        for n in range(1000):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(aio.wait(app.AsyncResult("never")), 0.001 * (n % 5 + 1))

    asyncio.run(cancel_many())
    mux = app.backend.waiter.mux
    assert mux.waits == 0
    watchers = app.backend.layout.watchers("never")
    wait_until(lambda: not client.exists(watchers), "the registration is gone")
    # Later waits work, on the same few connections, none out of step.
    app.backend.store_result("later", "fine", states.SUCCESS)
    assert asyncio.run(aio.wait(app.AsyncResult("later"), timeout=5)) == "fine"
    assert app.AsyncResult("later").get(timeout=5) == "fine"
    assert len([c for c in client.client_list() if c["name"] == "cancelled"]) <= 8


def test_a_server_that_stays_away_fails_the_waits(make_app: Any) -> None:
    srv = EmbeddedServer().start()
    app = _app(make_app, srv, result_backend_transport_options={"retry_policy": {"max_retries": 2}})
    client = redis.Redis(port=srv.port)
    waiting = Waiting(lambda: _get(app, "t1", "sync", 60))
    _registered(app, client, "t1")
    srv.stop()
    error = waiting.result()
    assert not isinstance(error, TimeoutError)
    assert f"127.0.0.1:{srv.port}" in str(error)


def test_aio_needs_the_perkey_backend(make_app: Any, server: Any) -> None:
    from celery_perkey_backend import ConfigurationError

    app = make_app(backend=f"redis://127.0.0.1:{server.port}/2")
    with pytest.raises(ConfigurationError, match="needs the perkey result backend"):
        asyncio.run(aio.wait(app.AsyncResult("t1"), timeout=1))


def test_multiplex_auto_follows_gevent(make_app: Any) -> None:
    assert make_app().backend.settings.multiplexed is ("gevent.monkey" in sys.modules)
    assert make_app(perkey_multiplex="false").backend.waiter.multiplex is False
    assert make_app(perkey_multiplex="yes").backend.waiter.multiplex is True


def test_no_watcher_is_left_by_a_finished_wait(make_app: Any, own: Any) -> None:
    app = _app(make_app, own)
    client = redis.Redis(port=own.port)
    with pytest.raises(TimeoutError):
        app.AsyncResult("gone").get(timeout=0.3)
    wait_until(
        lambda: not client.exists(app.backend.layout.watchers("gone")),
        "the timed-out wait unregistered",
    )
