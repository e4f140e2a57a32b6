"""redis-py's own defaults never reach our waits, and the URL's protocol reaches redis-py.

redis-py 8 gives every client a 5 s socket timeout and ten retries with backoff unless
told otherwise. A wait blocks up to 10 s at a time, and lost connections are retried by
our one policy only: these tests hold both, under whichever redis-py and protocol the
run uses (they are core tests: ``dev.py matrix`` runs them under each).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import states
from celery.exceptions import TimeoutError

from celery_perkey_backend import BackendUnavailableError
from celery_perkey_backend.testing import EmbeddedServer, free_port

from .conftest import wait_until

#: Commands a wait blocks in (BLMOVE on its result list, BRPOPLPUSH before Redis 6.2,
#: BLPOP on the multiplexer's inbox).
BLOCKING = {"blmove", "brpoplpush", "blpop"}


def test_a_ten_second_block_is_not_cut_by_a_five_second_socket_timeout(
    make_app: Any, own_server: EmbeddedServer
) -> None:
    """A wait's first step blocks 10 s: the result stored over 6 s into it (by the
    server's clock) is returned on the connection the wait had from the start."""
    r = redis.Redis(port=own_server.port)
    app = make_app(backend=f"perkey://127.0.0.1:{own_server.port}/0")
    # The storer has its own pool (another host name). Both pools connect before the
    # count starts; a wait then needs one connection, which it takes from its pool.
    storer = make_app(backend=f"perkey://localhost:{own_server.port}/0")
    storer.backend.store_result("warm-up", 0, states.SUCCESS)
    assert app.AsyncResult("warm-up").get(timeout=5) == 0
    received = r.info("stats")["total_connections_received"]
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(app.AsyncResult("t1").get(timeout=12)))
    waiter.start()
    try:
        wait_until(lambda: _blocked_for(r, 7), "a wait has blocked for over 6 s", 20)
        storer.backend.store_result("t1", "after 6 s", states.SUCCESS)
        waiter.join(12)
    finally:
        if waiter.is_alive():
            storer.backend.store_result("t1", "unblock", states.SUCCESS)
            waiter.join(12)
    assert got == ["after 6 s"]
    assert r.info("stats")["total_connections_received"] == received  # no reconnect


@pytest.fixture
def own_server() -> Iterator[EmbeddedServer]:
    """A server of this test's own: its blocked clients are this test's only."""
    server = EmbeddedServer().start()
    yield server
    server.stop()


def _blocked_for(r: redis.Redis, seconds: int) -> bool:
    """Whether the one client in a blocking command has sat in it ``seconds``."""
    blocked = [c for c in r.client_list() if c["cmd"] in BLOCKING and "b" in c["flags"]]
    assert len(blocked) <= 1, blocked
    return bool(blocked) and int(blocked[0]["idle"]) >= seconds


class _Refuser:
    """A TCP listener that takes every connection and closes it at once, counting them:
    a server that is reachable and never answers a handshake."""

    def __init__(self) -> None:
        self.port = free_port()
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def refuser() -> Iterator[_Refuser]:
    listener = _Refuser()
    yield listener
    listener.close()


@pytest.mark.parametrize("retries", [0, 3])
def test_a_wait_connects_once_per_try_of_the_policy(
    make_app: Any, refuser: _Refuser, retries: int
) -> None:
    """Each failed connect is one try of our policy: 1 + ``max_retries`` connections in
    all, none added by redis-py's own retries (ten, by redis-py 8's default)."""
    app = make_app(
        backend=f"perkey://127.0.0.1:{refuser.port}/0",
        result_backend_transport_options={
            "retry_policy": {
                "max_retries": retries,
                "interval_start": 0,
                "interval_step": 0,
                "interval_max": 0,
            }
        },
    )
    with pytest.raises(BackendUnavailableError):
        app.AsyncResult("t1").get(timeout=30)
    assert refuser.accepted == 1 + retries


@pytest.mark.parametrize("protocol", [2, 3])
def test_the_urls_protocol_reaches_redis_py(
    make_app: Any, r: redis.Redis, server: EmbeddedServer, protocol: int
) -> None:
    """``?protocol=`` in the backend URL is the RESP version its connections speak, and
    our scripts' replies read the same under it: nothing (a nil), then the result."""
    url = f"perkey://127.0.0.1:{server.port}/0?protocol={protocol}"
    app = make_app(backend=url, perkey_read_once=True)
    with pytest.raises(TimeoutError):
        app.AsyncResult("t1").get(timeout=0.2)  # the take script finds nothing
    app.backend.store_result("t1", {"answer": [1, 2.5, None]}, states.SUCCESS)
    assert app.AsyncResult("t1").get(timeout=5) == {"answer": [1, 2.5, None]}
    with pytest.raises(TimeoutError):
        app.AsyncResult("t1").get(timeout=0.2)  # taken: read once
    pool = app.backend.store.client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_command("CLIENT", "ID")
        own = conn.read_response()
        assert conn.get_protocol() == protocol
    finally:
        pool.release(conn)
    (listed,) = [c for c in r.client_list() if int(c["id"]) == own]
    # The server says so too where it lists it (Redis 7 and Valkey; not Redis 6.2).
    if "resp" in listed:
        assert int(listed["resp"]) == protocol
