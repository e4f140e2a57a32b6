"""Every wait honours its deadline, whatever the server does.

The link is stalled for real, through the tests' TCP proxy: it keeps connections open
and forwards nothing. Settings are Celery's defaults (a 120 s socket timeout), so only
the wait's own deadline can end these waits in time. The bounds below are generous on
purpose (a loaded machine is slow); without the deadline they would take minutes.
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
from celery_perkey_backend.testing import free_port

from .conftest import timed, wait_for_blocked_clients
from .netproxy import Proxy

#: How far past its deadline a wait may end here: the promise is about 0.5 s, the rest
#: is room for a loaded test machine.
SLACK = 2.5


@pytest.fixture
def stalled(make_app: Any, server: Any) -> Iterator[tuple[Proxy, Any]]:
    proxy = Proxy(server.port)
    yield proxy, make_app(backend=f"perkey://127.0.0.1:{proxy.port}/0")
    proxy.close()


def test_a_link_stalled_before_the_wait(stalled: tuple[Proxy, Any]) -> None:
    proxy, app = stalled
    app.backend.store_result("warm", 1, states.SUCCESS)  # a pooled connection exists
    proxy.blackholed = True
    error, elapsed = timed(lambda: app.AsyncResult("t1").get(timeout=3))
    assert isinstance(error, TimeoutError)
    assert elapsed < 3 + SLACK


def test_a_link_stalled_before_the_first_connection(stalled: tuple[Proxy, Any]) -> None:
    proxy, app = stalled
    proxy.blackholed = True  # the TCP connect succeeds; the handshake gets no answer
    error, elapsed = timed(lambda: app.AsyncResult("t1").get(timeout=2))
    assert isinstance(error, TimeoutError)
    assert elapsed < 2 + SLACK


@pytest.mark.parametrize("on_message", [False, True], ids=["get", "on_message"])
def test_a_link_that_stalls_mid_wait(
    stalled: tuple[Proxy, Any], r: redis.Redis, on_message: bool
) -> None:
    """The block is cut and the reconnect's handshake gets no answer: the deadline ends it."""
    proxy, app = stalled
    outcome: list[Any] = []
    kwargs: dict[str, Any] = {"on_message": lambda meta: None} if on_message else {}

    def wait() -> None:
        outcome.extend(timed(lambda: app.AsyncResult("t1").get(timeout=4, **kwargs)))

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_for_blocked_clients(r, 1)
    proxy.blackholed = True
    proxy.cut()
    waiter.join(60)
    error, elapsed = outcome
    assert isinstance(error, TimeoutError)
    assert elapsed < 4 + SLACK


def test_a_group_join_on_a_stalled_link(stalled: tuple[Proxy, Any]) -> None:
    proxy, app = stalled
    for i in range(3):
        app.backend.store_result(f"t{i}", i, states.SUCCESS)
    proxy.blackholed = True
    group = app.GroupResult("g", [app.AsyncResult(f"t{i}") for i in range(4)])
    error, elapsed = timed(lambda: group.get(timeout=2))
    assert isinstance(error, TimeoutError)
    assert elapsed < 2 + SLACK


@pytest.fixture
def plain_port() -> Iterator[int]:
    """A server that takes TCP connections and never answers: like a plain-TCP Redis
    that reads a TLS hello as a command without its newline."""
    listener = socket.create_server(("127.0.0.1", free_port()))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()
    for conn in accepted:
        conn.close()


def test_a_tls_url_to_a_server_without_tls(make_app: Any, server: Any) -> None:
    app = make_app(backend=f"perkey+rediss://127.0.0.1:{server.port}/0?ssl_cert_reqs=CERT_NONE")
    error, elapsed = timed(lambda: app.AsyncResult("t1").get(timeout=3))
    assert isinstance(error, TimeoutError)
    assert elapsed < 3 + SLACK


def test_the_connect_timeout_bounds_a_tls_handshake_for_stores(
    make_app: Any, plain_port: int
) -> None:
    app = make_app(
        backend=f"perkey+rediss://127.0.0.1:{plain_port}/0?ssl_cert_reqs=CERT_NONE",
        redis_socket_connect_timeout=1,
        result_backend_transport_options={"retry_policy": {"max_retries": 1}},
    )
    error, elapsed = timed(lambda: app.backend.store_result("t1", 1, states.SUCCESS))
    assert isinstance(error, BackendUnavailableError)
    # Two attempts of 1 s each, not two of redis_socket_timeout (120 s by default).
    assert elapsed < 2 + SLACK


def test_the_default_connect_timeout_is_short(make_app: Any, plain_port: int) -> None:
    app = make_app(
        backend=f"perkey://127.0.0.1:{plain_port}/0",
        result_backend_transport_options={"retry_policy": {"max_retries": 0}},
    )
    assert app.backend.settings.connection_options["socket_connect_timeout"] == 5.0
    error, elapsed = timed(lambda: app.AsyncResult("t1").state)
    assert isinstance(error, BackendUnavailableError)
    assert elapsed < 5 + SLACK
