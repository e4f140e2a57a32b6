"""Read-once takes survive a lost reply: the server took the result, the client never
heard, and the retry of the take gets it back (a real server, the proxy dropping the
take's reply), on a wait's own connection and through the multiplexer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import states
from celery.exceptions import TimeoutError

from celery_perkey_backend import aio
from celery_perkey_backend.testing import EmbeddedServer

from .conftest import wait_for_blocked_clients, wait_until
from .netproxy import Proxy


def _lone_reply_holding(marker: bytes, skip: int = 0) -> Callable[[bytes], bool]:
    """Says yes to a reply that is one bulk string holding ``marker`` (what the take
    script answers), after ``skip`` such replies (a rotation answers the same)."""
    seen = [0]

    def chosen(data: bytes) -> bool:
        head, sep, rest = data.partition(b"\r\n")
        lone = head[:1] == b"$" and head[1:].isdigit() and len(rest) == int(head[1:]) + 2
        if not (sep and lone and marker in rest):
            return False
        seen[0] += 1
        return seen[0] > skip

    return chosen


@pytest.fixture
def proxy(server: EmbeddedServer) -> Iterator[Proxy]:
    proxy = Proxy(server.port)
    yield proxy
    proxy.close()


def _proxied_app(make_app: Any, proxy: Proxy, **conf: Any) -> Any:
    return make_app(
        backend=f"perkey://127.0.0.1:{proxy.port}/0",
        perkey_read_once=True,
        redis_socket_timeout=1,
        result_backend_transport_options={
            "retry_policy": {"max_retries": 10, "interval_start": 0.1, "interval_max": 0.2}
        },
        **conf,
    )


def _nobody_else_gets(make_app: Any, r: redis.Redis, task_id: str) -> None:
    """A second read-once reader finds nothing, and no key is left behind."""
    other = make_app(perkey_read_once=True)
    with pytest.raises(TimeoutError):
        other.AsyncResult(task_id).get(timeout=0.5)
    wait_until(lambda: r.dbsize() == 0, "nothing left behind")


def test_a_take_whose_reply_is_lost_is_retried_and_gets_the_result(
    make_app: Any, proxy: Proxy, r: redis.Redis
) -> None:
    app = _proxied_app(make_app, proxy)
    assert app.AsyncResult("warm").state == states.PENDING  # the connection is up
    make_app().backend.store_result("t1", "taken-once", states.SUCCESS)
    proxy.drop_reply_if = _lone_reply_holding(b"taken-once")
    started = time.monotonic()
    assert app.AsyncResult("t1").get(timeout=10) == "taken-once"
    assert proxy.drop_reply_if is None, "the take's reply was not dropped"
    assert time.monotonic() - started < 10
    _nobody_else_gets(make_app, r, "t1")


def test_a_woken_wait_whose_take_reply_is_lost_gets_the_result(
    make_app: Any, proxy: Proxy, r: redis.Redis
) -> None:
    app = _proxied_app(make_app, proxy)
    outcome: list[Any] = []

    def wait() -> None:
        try:
            outcome.append(app.AsyncResult("t1").get(timeout=15))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    wait_for_blocked_clients(r, 1)
    # The rotation that wakes the wait answers with the element too: drop the take's.
    proxy.drop_reply_if = _lone_reply_holding(b"woken-once", skip=1)
    make_app().backend.store_result("t1", "woken-once", states.SUCCESS)
    thread.join(20)
    assert outcome == ["woken-once"]
    assert proxy.drop_reply_if is None, "the take's reply was not dropped"
    _nobody_else_gets(make_app, r, "t1")


@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_a_multiplexed_take_whose_reply_is_lost_gets_the_result_once(
    make_app: Any, proxy: Proxy, r: redis.Redis, mode: str
) -> None:
    app = _proxied_app(make_app, proxy, perkey_multiplex=True)

    def get(task_id: str, timeout: float) -> Any:
        result = app.AsyncResult(task_id)
        if mode == "sync":
            return result.get(timeout=timeout)
        return asyncio.run(aio.wait(result, timeout=timeout))

    make_app().backend.store_result("warm", "up", states.SUCCESS)
    assert get("warm", 10) == "up"  # the multiplexer's connections are up
    outcomes: list[Any] = []

    def wait() -> None:
        try:
            outcomes.append(get("t1", 8))
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=wait) for _ in range(2)]
    for thread in threads:
        thread.start()
    watchers = app.backend.layout.watchers("t1")
    wait_until(lambda: app.backend.waiter.mux.waits >= 2, "two waits started")
    wait_until(lambda: r.scard(watchers) >= 1, "the waits are registered")
    proxy.drop_reply_if = _lone_reply_holding(b"muxed-once")
    make_app().backend.store_result("t1", "muxed-once", states.SUCCESS)
    for thread in threads:
        thread.join(20)
    assert proxy.drop_reply_if is None, "the take's reply was not dropped"
    assert outcomes.count("muxed-once") == 1, outcomes
    assert sum(isinstance(o, TimeoutError) for o in outcomes) == 1, outcomes
    _nobody_else_gets(make_app, r, "t1")


def test_the_sweep_and_stats_know_a_take_s_copy(app: Any, r: redis.Redis) -> None:
    # A copy whose taker never came back (it expires on its own) and one that lost its
    # TTL (e.g. PERSIST by hand): both are ours, of the expected type.
    layout = app.backend.layout
    app.backend.store_result("t1", "copied", states.SUCCESS)
    element = r.lindex(layout.result("t1"), 0)
    r.set(layout.taken("t1", "tok1"), element, px=60_000)
    r.set(layout.taken("t1", "tok2"), element)
    stats = app.backend.stats()
    assert stats.by_kind.get("taken") == 2
    assert stats.unexpected_type == 0
    assert stats.no_ttl == 1
    summary = app.backend.run_sweep()
    assert summary.by_class["unexpected"] == 0
    assert summary.by_class["no_ttl"] == 1
    assert r.pttl(layout.taken("t1", "tok2")) > 0


def test_while_a_take_s_retry_is_due_no_other_reader_gets_the_result(
    make_app: Any, proxy: Proxy, r: redis.Redis
) -> None:
    app = _proxied_app(make_app, proxy)
    assert app.AsyncResult("warm").state == states.PENDING  # the connection is up
    make_app().backend.store_result("t1", "one-reader", states.SUCCESS)
    proxy.drop_reply_if = _lone_reply_holding(b"one-reader")
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(app.AsyncResult("t1").get(timeout=10)))
    thread.start()
    # The server took it and the reply is lost; the taker retries once its read times out.
    wait_until(lambda: proxy.drop_reply_if is None, "the take's reply was dropped")
    other = make_app(perkey_read_once=True)
    with pytest.raises(TimeoutError):
        other.AsyncResult("t1").get(timeout=0.3)
    thread.join(15)
    assert outcome == ["one-reader"]
    wait_until(lambda: r.dbsize() == 0, "nothing left behind")
