"""Deadlines that hold beyond the wait itself: parent checks, Sentinel discovery, and
timeouts that are not a plain positive number.

The link is stalled for real (the tests' proxy blackholes it) and the settings are
Celery's defaults (a 120 s socket timeout), so only the wait's own deadline can end
these calls in time. Each test is itself bounded, so that a deadline that does not hold
fails the test rather than hanging it.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import chain, states
from celery.exceptions import TimeoutError

from celery_perkey_backend import aio
from celery_perkey_backend.testing import free_port

from .conftest import timed, wait_for_blocked_clients
from .netproxy import Proxy

#: How far past its deadline a call may end here: the promise is 0.5 s, the rest is room
#: for a loaded test machine.
SLACK = 0.5 + 2.0


@pytest.fixture(params=[False, True], ids=["own-connection", "multiplexed"])
def stalled_chain(make_app: Any, server: Any, request: Any) -> Iterator[tuple[Proxy, Any, Any]]:
    """A chain sent (no worker runs it), and the backend's link then blackholed."""
    proxy = Proxy(server.port)
    app = make_app(backend=f"perkey://127.0.0.1:{proxy.port}/0", perkey_multiplex=request.param)
    result = chain(app.tasks["t.add"].s(1, 1), app.tasks["t.add"].s(2)).apply_async()
    assert result.parent is not None
    app.backend.store_result("warm", 1, states.SUCCESS)  # a pooled connection exists
    proxy.blackholed = True
    yield proxy, app, result
    proxy.close()


@pytest.mark.timeout(30)
def test_get_of_a_chain_on_a_stalled_link(stalled_chain: tuple[Proxy, Any, Any]) -> None:
    """The parent check before the wait runs under the wait's deadline."""
    _, _, result = stalled_chain
    error, elapsed = timed(lambda: result.get(timeout=3))
    assert isinstance(error, TimeoutError), repr(error)
    assert elapsed < 3 + SLACK


@pytest.mark.timeout(30, method="thread")  # a signal cannot end a thread the loop awaits
def test_aio_wait_of_a_chain_on_a_stalled_link(stalled_chain: tuple[Proxy, Any, Any]) -> None:
    """In asyncio too, and without the loop's default executor."""
    _, _, result = stalled_chain

    async def main() -> tuple[BaseException | None, float, set[Any]]:
        loop = asyncio.get_running_loop()
        used: set[Any] = set()
        original = loop.run_in_executor

        def spy(executor: Any, *args: Any) -> Any:
            used.add(executor)
            return original(executor, *args)

        loop.run_in_executor = spy  # type: ignore[method-assign]
        started = time.monotonic()
        try:
            await aio.wait(result, timeout=3)
        except BaseException as exc:
            return exc, time.monotonic() - started, used
        return None, time.monotonic() - started, used

    error, elapsed, executors = asyncio.run(main())
    assert isinstance(error, TimeoutError), repr(error)
    assert elapsed < 3 + SLACK
    assert None not in executors


@pytest.mark.timeout(30)
@pytest.mark.parametrize("multiplex", [False, True], ids=["own-connection", "multiplexed"])
@pytest.mark.parametrize("on_message", [False, True], ids=["get", "on_message"])
def test_a_chain_whose_link_stalls_mid_wait(
    make_app: Any, server: Any, r: Any, multiplex: bool, on_message: bool
) -> None:
    """The parent checks between the wait's steps run under its deadline too."""
    proxy = Proxy(server.port)
    try:
        app = make_app(backend=f"perkey://127.0.0.1:{proxy.port}/0", perkey_multiplex=multiplex)
        result = chain(app.tasks["t.add"].s(1, 1), app.tasks["t.add"].s(2)).apply_async()
        kwargs: dict[str, Any] = {"on_message": lambda meta: None} if on_message else {}
        outcome: list[Any] = []
        waiter = threading.Thread(
            target=lambda: outcome.extend(timed(lambda: result.get(timeout=4, **kwargs)))
        )
        waiter.start()
        wait_for_blocked_clients(r, 1)  # the wait (or the multiplexer's reader) blocks
        proxy.blackholed = True
        waiter.join(25)
        error, elapsed = outcome
        assert isinstance(error, TimeoutError), repr(error)
        assert elapsed < 4 + SLACK
    finally:
        proxy.close()


@pytest.mark.timeout(30)
def test_a_nan_timeout_is_refused(app: Any) -> None:
    error, _ = timed(lambda: app.AsyncResult("never-stored").get(timeout=math.nan))
    assert isinstance(error, ValueError), repr(error)
    assert "nan" in str(error)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("multiplex", [False, True], ids=["own-connection", "multiplexed"])
def test_a_negative_timeout_is_taken_as_zero(make_app: Any, multiplex: bool) -> None:
    """As with Celery's own backends: what is stored is returned, nothing is waited for."""
    app = make_app(perkey_multiplex=multiplex)
    app.backend.store_result("stored", 42, states.SUCCESS)
    assert app.AsyncResult("stored").get(timeout=-5) == 42
    error, elapsed = timed(lambda: app.AsyncResult("never-stored").get(timeout=-5))
    assert isinstance(error, TimeoutError), repr(error)
    assert elapsed < 0 + SLACK


@pytest.mark.timeout(30, method="thread")
@pytest.mark.parametrize("how", ["wait", "as_completed", "watch"])
def test_aio_refuses_a_nan_timeout(app: Any, how: str) -> None:
    result = app.AsyncResult("never-stored")

    async def main() -> None:
        if how == "wait":
            await aio.wait(result, timeout=math.nan)
        elif how == "as_completed":
            async for _ in aio.as_completed([result], timeout=math.nan):
                pass
        else:
            async for _ in aio.watch(result, timeout=math.nan):
                pass

    with pytest.raises(ValueError, match="nan"):
        asyncio.run(main())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", ["3", True, [1]])
def test_a_timeout_that_is_no_number_is_refused(app: Any, bad: Any) -> None:
    with pytest.raises(TypeError, match="timeout must be a number of seconds"):
        app.AsyncResult("never-stored").get(timeout=bad)


@pytest.fixture
def proxies(server: Any) -> Iterator[list[Proxy]]:
    made: list[Proxy] = []
    yield made
    for proxy in made:
        proxy.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("down", ["refusing", "blackholed"])
def test_get_with_every_sentinel_down(
    make_app: Any, server: Any, proxies: list[Proxy], count: int, down: str
) -> None:
    """Discovery runs without redis-py's own retries, bounded by the wait's deadline:
    Sentinels that refuse connections, or take them and never answer."""
    ports = []
    for _ in range(count):
        if down == "refusing":
            ports.append(free_port())  # nothing listens there
        else:
            proxy = Proxy(server.port)
            proxy.blackholed = True
            proxies.append(proxy)
            ports.append(proxy.port)
    url = "perkey+" + ";".join(f"sentinel://127.0.0.1:{port}" for port in ports) + "/0"
    app = make_app(backend=url, result_backend_transport_options={"master_name": "mymaster"})
    error, elapsed = timed(lambda: app.AsyncResult("t1").get(timeout=2))
    assert isinstance(error, TimeoutError), repr(error)
    assert elapsed < 2 + SLACK
