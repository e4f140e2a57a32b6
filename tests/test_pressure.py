"""Waits under pressure: a server out of memory, and a client pool that is full."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import states
from celery.exceptions import TimeoutError

from celery_perkey_backend import StoreCommandError, connection
from celery_perkey_backend.testing import EmbeddedServer

from .conftest import command_calls, wait_for_blocked_clients, wait_until

# -- a full server ---------------------------------------------------------------------


#: Junk written before the limit is set: 64 keys of 64 KB.
JUNK_KEYS, JUNK = 64, b"x" * 65536


def _fill(client: redis.Redis) -> int:
    """Make the server refuse every write: junk, then ``maxmemory`` 1 MB below what is
    used; how many junk keys it took.

    Filling up to the limit would leave a few KB of room now and then (a refused
    command's buffer is freed after the refusal, and idle clients' buffers shrink), so a
    small store could still fit; 1 MB over the limit leaves none, and deleting the junk
    makes room again."""
    for n in range(JUNK_KEYS):
        client.set(f"junk:{n}", JUNK)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used - 1024 * 1024)
    return JUNK_KEYS


@pytest.fixture
def full(make_app: Any) -> Iterator[tuple[redis.Redis, Any, int]]:
    """A server at ``maxmemory`` with ``noeviction``, an app on it, and the junk count."""
    with EmbeddedServer(args=["--maxmemory-policy", "noeviction"]) as srv:
        client = redis.Redis(port=srv.port)
        app = make_app(backend=f"perkey://127.0.0.1:{srv.port}/0")
        yield client, app, _fill(client)
        client.close()


def _free(client: redis.Redis, junk: int) -> None:
    client.delete(*[f"junk:{n}" for n in range(junk)])


def test_stores_at_the_limit_fail_clearly(full: tuple[redis.Redis, Any, int]) -> None:
    _, app, _ = full
    with pytest.raises(StoreCommandError, match=r"store result of task 't1'.*maxmemory"):
        app.backend.store_result("t1", 1, states.SUCCESS)


@pytest.mark.parametrize("on_message", [False, True], ids=["get", "on_message"])
def test_a_wait_reads_while_the_server_is_full_and_blocks_again_after(
    full: tuple[redis.Redis, Any, int], on_message: bool
) -> None:
    client, app, junk = full
    seen: list[str] = []
    kwargs: dict[str, Any] = {"on_message": lambda meta: seen.append(meta["status"])}
    outcome: list[Any] = []

    def wait() -> None:
        try:
            outcome.append(app.AsyncResult("t1").get(timeout=30, **(kwargs if on_message else {})))
        except BaseException as exc:
            outcome.append(exc)

    before = command_calls(client)
    waiter = threading.Thread(target=wait)
    waiter.start()
    # The blocking command is refused, so the wait reads instead.
    wait_until(lambda: command_calls(client)["lindex"] - before["lindex"] >= 3, "the wait reads")
    assert not outcome
    _free(client, junk)
    app.backend.store_result("t1", "stored once there was room", states.SUCCESS)
    waiter.join(30)
    assert outcome == ["stored once there was room"]
    if on_message:
        assert seen[0] == states.PENDING
        assert seen[-1] == states.SUCCESS
    # With room again, a new wait blocks, as before.
    waiter = threading.Thread(target=lambda: app.AsyncResult("t2").get(timeout=30))
    waiter.start()
    wait_for_blocked_clients(client, 1)
    app.backend.store_result("t2", "after", states.SUCCESS)
    waiter.join(30)


def test_a_wait_on_a_full_server_times_out_as_usual(full: tuple[redis.Redis, Any, int]) -> None:
    _, app, _ = full
    with pytest.raises(TimeoutError):
        app.AsyncResult("t1").get(timeout=1)


def test_read_once_takes_a_result_on_a_full_server(make_app: Any) -> None:
    with EmbeddedServer(args=["--maxmemory-policy", "noeviction"]) as srv:
        client = redis.Redis(port=srv.port)
        app = make_app(backend=f"perkey://127.0.0.1:{srv.port}/0", perkey_read_once=True)
        app.backend.store_result("t1", "taken", states.SUCCESS)
        _fill(client)
        assert app.AsyncResult("t1").get(timeout=5) == "taken"
        assert not client.exists(app.backend.layout.result("t1"))
        client.close()


# -- a full client pool ----------------------------------------------------------------


def test_waits_queue_for_a_full_pool(make_app: Any, r: redis.Redis) -> None:
    app = make_app(redis_max_connections=10, redis_client_name="pool-of-ten")
    workers = make_app()  # the results come from elsewhere, as from worker processes
    got: dict[int, Any] = {}

    def wait(i: int) -> None:
        try:
            got[i] = app.AsyncResult(f"t{i}").get(timeout=30)
        except BaseException as exc:
            got[i] = exc

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    wait_for_blocked_clients(r, 10)
    opened = [c for c in r.client_list() if c["name"] == "pool-of-ten"]
    for i in range(50):
        workers.backend.store_result(f"t{i}", i, states.SUCCESS)
    for thread in threads:
        thread.join(30)
    assert got == {i: i for i in range(50)}
    # The pool never opened more connections than it may.
    assert len(opened) == 10
    assert len([c for c in r.client_list() if c["name"] == "pool-of-ten"]) <= 10


@contextlib.contextmanager
def _pool_held(app: Any, r: redis.Redis, count: int, seconds: float) -> Iterator[None]:
    """``count`` waits that hold a connection each, blocked for ``seconds``."""
    holders = [
        threading.Thread(target=_quietly, args=(app, f"held{i}", seconds)) for i in range(count)
    ]
    for thread in holders:
        thread.start()
    wait_for_blocked_clients(r, count)
    yield
    for thread in holders:
        thread.join(30)


def test_a_deadline_passing_in_the_queue_names_the_pool(make_app: Any, r: redis.Redis) -> None:
    app = make_app(redis_max_connections=2)
    with (
        _pool_held(app, r, 2, 1.5),
        pytest.raises(TimeoutError, match=r"redis_max_connections=2"),
    ):
        app.AsyncResult("t1").get(timeout=0.5)


def test_a_store_queues_for_a_full_pool(make_app: Any, r: redis.Redis) -> None:
    app = make_app(redis_max_connections=2)
    with _pool_held(app, r, 2, 1.5):
        # Both connections block for 1.5 s; the store waits for one instead of failing.
        app.backend.store_result("t1", "queued", states.SUCCESS)
    assert r.exists(app.backend.layout.result("t1"))


def _quietly(app: Any, task_id: str, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        app.AsyncResult(task_id).get(timeout=timeout)


# -- after a burst ---------------------------------------------------------------------


def test_a_burst_of_waits_leaves_no_crowd_of_connections(
    make_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py keeps every idle connection for good; after a quiet spell the pool closes
    those above the floor, so 60 waits at once do not cost 60 clients for life."""
    monkeypatch.setattr(connection, "TRIM_AFTER", 0.3)
    with EmbeddedServer() as srv:
        client = redis.Redis(port=srv.port)
        url = f"perkey://127.0.0.1:{srv.port}/0"
        app = make_app(backend=url, perkey_multiplex=False, redis_client_name="burst")
        workers = make_app(backend=url)

        def ours() -> int:
            return len([c for c in client.client_list() if c["name"] == "burst"])

        outcome: dict[int, Any] = {}
        threads = [
            threading.Thread(
                target=lambda i=i: outcome.__setitem__(i, app.AsyncResult(f"t{i}").get(timeout=30))
            )
            for i in range(60)
        ]
        for thread in threads:
            thread.start()
        wait_for_blocked_clients(client, 60)
        assert ours() >= 60
        for i in range(60):
            workers.backend.store_result(f"t{i}", i, states.SUCCESS)
        for thread in threads:
            thread.join(30)
        assert outcome == {i: i for i in range(60)}
        wait_until(lambda: ours() <= connection.TRIM_FLOOR, "the idle connections closed")
        # Closed, not lost: the pool reconnects as it needs.
        workers.backend.store_result("after", "fine", states.SUCCESS)
        assert app.AsyncResult("after").get(timeout=5) == "fine"
        client.close()
