"""Figures 1-3: one store, one ready read, and the wake-up of a blocked waiter."""

from __future__ import annotations

import asyncio
import functools
import gc
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

from celery import Celery

from .common import (
    GET_TIMEOUT,
    VALUE,
    BackendSpec,
    close_app,
    make_app,
    median,
    new_id,
    now_ns,
    percentile,
    rpc_request,
    store_one,
)
from .context import Bench

#: A waiter of a polling backend first reads, then sleeps this long (``get()``'s default).
POLL_INTERVAL = 0.5

#: The pause between storing a result and timing its read (and before each floor PING).
READ_PAUSE = 0.001

#: How long the helper waits before an rpc store: nothing shows that the waiter waits.
RPC_SETTLE = 0.01


def _ping_samples(bench: Bench, spec: BackendSpec, n: int, pause: float = 0.0) -> list[float]:
    """PING round trips, each after ``pause`` seconds (as the figure's other samples)."""
    ping = bench.pinger(spec.redis_db or 0)
    samples = []
    for _ in range(n):
        if pause:
            time.sleep(pause)
        start = time.perf_counter_ns()
        ping()
        samples.append(time.perf_counter_ns() - start)
    return samples


def run_store(bench: Bench) -> None:
    """Figure 1: ``app.backend.store_result(task_id, value, "SUCCESS")``."""
    n = bench.sizes.store
    for _ in bench.round_range("store"):
        for spec in bench.specs:
            gc.collect()
            if spec.is_raw:
                samples = _ping_samples(bench, spec, n)
            else:
                backend = bench.app(spec.name).backend
                sink = bench.sink() if spec.is_rpc else ""
                samples = []
                for _ in range(n):
                    task_id = new_id()
                    request = rpc_request(task_id, sink) if spec.is_rpc else None
                    start = time.perf_counter_ns()
                    backend.store_result(task_id, VALUE, "SUCCESS", request=request)
                    samples.append(time.perf_counter_ns() - start)
                if spec.is_rpc:
                    bench.purge_sink()
            bench.results.add("store", spec.name, median(samples))
            bench.results.add_samples("store", spec.name, samples)


def run_read(bench: Bench) -> None:
    """Figure 2: ``app.AsyncResult(id).get()`` of a stored result, fresh each time."""
    n = bench.sizes.read
    for _ in bench.round_range("read"):
        for spec in bench.specs:
            gc.collect()
            if spec.is_raw:
                samples = _ping_samples(bench, spec, n, pause=READ_PAUSE)
            else:
                app = bench.app(spec.name)
                reply_to = bench.reply_to(spec)
                samples = []
                for _ in range(n):
                    task_id = new_id()
                    store_one(app, spec, task_id, reply_to)
                    time.sleep(READ_PAUSE)  # stored and (rpc) delivered before the read
                    start = time.perf_counter_ns()
                    value = app.AsyncResult(task_id).get(timeout=GET_TIMEOUT)
                    samples.append(time.perf_counter_ns() - start)
                    if value != VALUE:
                        raise AssertionError(f"{spec.name}: read back {value!r}")
            bench.results.add("read", spec.name, median(samples))
            bench.results.add_samples("read", spec.name, samples)


def _wake_args(
    bench: Bench, spec: BackendSpec, task_id: str, blocked_before: int
) -> dict[str, Any]:
    args: dict[str, Any] = {
        "backend": spec.name,
        "task_id": task_id,
        "probe": spec.probe,
        "need": blocked_before + 1,
        "reply_to": bench.reply_to(spec),
        "delay": 0.0,
    }
    if spec.probe == "subscribed":
        key = bench.app(spec.name).backend.get_key_for_task(task_id)
        args["channel"] = key.decode() if isinstance(key, bytes) else str(key)
        args["need"] = 1
    elif spec.polling:
        # A random phase against the poll interval, as real arrivals have.
        args["delay"] = 0.005 + random.uniform(0.0, POLL_INTERVAL)
    elif spec.is_rpc:
        args["delay"] = RPC_SETTLE
    return args


def wake_once(bench: Bench, spec: BackendSpec, blocked_before: int) -> tuple[float, bool]:
    """One wake-up: block here, let the helper store; ns from issuing the store to return.

    Returns the latency and whether the helper saw the waiter wait before storing.
    """
    task_id = new_id()
    bench.helper.send("wake", **_wake_args(bench, spec, task_id, blocked_before))
    failure: BaseException | None = None
    try:
        if spec.is_raw:
            reply = bench.client(spec.redis_db or 0).brpop([task_id], timeout=GET_TIMEOUT)
            if reply is None:
                raise TimeoutError("BRPOP timed out")
            bench.client(spec.redis_db or 0).delete(task_id)
        else:
            value = bench.app(spec.name).AsyncResult(task_id).get(timeout=GET_TIMEOUT)
            if value != VALUE:
                raise AssertionError(f"{spec.name}: woke with {value!r}")
    except BaseException as exc:
        failure = exc
    returned = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    issued, seen = bench.helper.receive(GET_TIMEOUT)
    if failure is not None:
        raise failure
    return float(returned - issued), bool(seen)


class Multiplexed:
    """perkey's multiplexed waits for figure 3: ``get()`` with ``perkey_multiplex=True``
    (row ``perkey-mux``) and ``aio.wait`` on an event loop of its own (``perkey-aio``).

    Neither blocks a connection of its own, so the helper stores once the task's
    watchers key exists: the wait has registered, and no store can miss it.
    """

    ROWS = ("perkey-mux", "perkey-aio")

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.spec = bench.spec("perkey")
        self.app: Celery = make_app(self.spec, perkey_multiplex=True)
        self.loop = asyncio.new_event_loop()

    def once(self, row: str) -> tuple[float, bool]:
        """One wake-up of ``row``'s wait: latency and whether the helper saw it wait."""
        task_id = new_id()
        self.bench.helper.send(
            "wake", backend="perkey", task_id=task_id, probe="registered",
            channel=self.app.backend.layout.watchers(task_id), db=self.spec.redis_db or 0,
        )  # fmt: skip
        failure: BaseException | None = None
        returned = 0
        try:
            if row == "perkey-aio":
                returned = self.loop.run_until_complete(self._aio(task_id))
            else:
                value = self.app.AsyncResult(task_id).get(timeout=GET_TIMEOUT)
                returned = now_ns()
                if value != VALUE:
                    raise AssertionError(f"{row}: woke with {value!r}")
        except BaseException as exc:
            failure = exc
            returned = now_ns()
        issued, seen = self.bench.helper.receive(GET_TIMEOUT)
        if failure is not None:
            raise failure
        return float(returned - issued), bool(seen)

    async def _aio(self, task_id: str) -> int:
        from celery_perkey_backend import aio

        value = await aio.wait(self.bench.app("perkey").AsyncResult(task_id), timeout=GET_TIMEOUT)
        returned = now_ns()
        if value != VALUE:
            raise AssertionError(f"perkey-aio: woke with {value!r}")
        return returned

    def close(self) -> None:
        self.loop.close()
        close_app(self.app)


def _wake_rows(
    bench: Bench, multiplexed: Multiplexed | None
) -> Iterator[tuple[str, bool, Callable[[], tuple[float, bool]]]]:
    """Each row of a round, in order: its name, whether it polls, one wake-up of it."""
    for spec in bench.specs:
        # Counted just before the row's samples, as the helper's probe counts.
        blocked_before = bench.blocked_clients()
        yield spec.name, spec.polling, functools.partial(wake_once, bench, spec, blocked_before)
        if spec.name == "perkey" and multiplexed is not None:
            for row in Multiplexed.ROWS:
                yield row, False, functools.partial(multiplexed.once, row)


def run_wake(bench: Bench) -> None:
    """Figure 3: wake-up latency p50/p90/p99 of a waiter blocked before the store, and
    (``bench.multiplexed_wake``) of perkey's multiplexed ``get()`` and ``aio.wait``."""
    unseen: dict[str, int] = {}
    multiplexed = Multiplexed(bench) if bench.multiplexed_wake and bench.has("perkey") else None
    try:
        for _ in bench.round_range("wake"):
            for name, polling, wake in _wake_rows(bench, multiplexed):
                n = bench.sizes.wake_polling if polling else bench.sizes.wake
                gc.collect()
                samples = []
                for _ in range(n):
                    latency, seen = wake()
                    samples.append(latency)
                    if not seen:
                        unseen[name] = unseen.get(name, 0) + 1
                for q in (50, 90, 99):
                    bench.results.add(f"wake_p{q}", name, percentile(samples, q))
                bench.results.add_samples("wake", name, samples)
    finally:
        if multiplexed is not None:
            multiplexed.close()
    for name, count in unseen.items():
        bench.results.note(
            f"wake: {count} sample(s) of {name} were stored before the helper saw the waiter "
            "wait (probe limit reached)."
        )
