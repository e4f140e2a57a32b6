"""Figure 11: many waiters, N concurrent waits in one process.

Each row runs one way of waiting (:data:`MODES`) at one N, in a *waiting process* of its
own (``python -m benchmarks.waiters``, gevent-patched for the gevent modes), so that its
connections and its CPU are its own:

1. The waiting process builds its app (``redis_client_name`` set to a name of the row's
   own, which every connection it opens carries), waits once on a stored result through
   the same path (imports, pools, the multiplexer's threads), then starts N waits, each
   on a task of its own, and prints ``launched``.
2. This process watches the server until every wait shows (:attr:`Mode.sign`): its
   task's watchers key exists (multiplexed waits, registered), the process's
   connections blocked (a blocking wait each), its task's channel subscribed (redis://),
   or, for the polling mode, every wait has made its first read (the waiting process
   says so). It goes on when the count stalls too: waits that fail (``max number of
   clients reached``) never show.
3. It counts the process's connections in CLIENT LIST by their name, leaves the waits
   idle for :data:`HOLD` s, then has the helper process store the N results back to
   back, as fast as it can, each store issued at a CLOCK_MONOTONIC time it reports.
4. The waiting process reads the same clock as each wait returns, and writes every
   delivery time, its errors and its CPU (``getrusage``: from launching the first wait
   to the last delivery, and sampled every :data:`SAMPLE` s, which gives its CPU share
   during the idle hold) to a file, then exits.

Reported per row: connections held, waits failed, the stores' duration, (last delivery -
first store issued) / that duration, the p50 and p99 of delivery - that task's store
issued, and the client's CPU. Thread modes stop at ``Sizes.many_threads`` waits, modes
with a connection per wait at ``Sizes.many_per_connection``; the server's ``maxclients``
is ``Sizes.many_maxclients`` meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery, states

from .common import (
    GET_TIMEOUT,
    MANY_MODES,
    ROOT,
    VALUE,
    BackendSpec,
    build_specs,
    make_app,
    new_id,
    now_ns,
    percentile,
    row_label,
    store_one,
)
from .context import Bench

#: Seconds of idle waiting, all waits started and seen, before the stores begin; the
#: waiting process's CPU is read across them.
HOLD = 0.5

#: The count of waits seen waiting has not grown for this long: go on without the rest.
STALL = 5.0

#: The waiting process is done once no result has arrived for this long after the first.
QUIET = 15.0

#: The polling mode: its pause between two reads of a result, and its pool's size.
POLL_PAUSE = 0.1
POLL_CONNECTIONS = 8

#: The waiting process's warm-up result (stored by this process, in the row's db).
WARM = "warm-many"

#: How often the waiting process samples its CPU.
SAMPLE = 0.05

#: Thread stacks of the thread modes (as figure 8).
THREAD_STACK = 512 * 1024


@dataclass(frozen=True)
class Mode:
    """One way of waiting.

    ``backend``: whose results it waits for (``perkey`` or ``redis``), stored by the
    helper through that backend; ``kind``: ``aio``, ``gevent``, ``threads`` or
    ``poll``; ``conf``: the app's extra settings; ``connection_each``: a connection (or
    two) per wait; ``sign``: how the server shows that a wait waits (see the module).
    """

    name: str
    backend: str
    kind: str
    sign: str
    conf: tuple[tuple[str, Any], ...] = ()
    connection_each: bool = False

    @property
    def multiplexed(self) -> bool | None:
        """Whether perkey's ``get()`` must go through the multiplexer (``None``: n/a)."""
        if self.backend != "perkey" or self.kind == "aio":
            return None
        return not self.connection_each


MODES = {
    mode.name: mode
    for mode in (
        Mode("many-aio", "perkey", "aio", "registered"),
        Mode("many-gevent", "perkey", "gevent", "registered", (("perkey_multiplex", "auto"),)),
        Mode("many-threads-mux", "perkey", "threads", "registered", (("perkey_multiplex", True),)),
        Mode(
            "many-threads", "perkey", "threads", "blocked", (("perkey_multiplex", False),),
            connection_each=True,
        ),
        Mode("many-redis-threads", "redis", "threads", "subscribed", connection_each=True),
        Mode("many-redis-gevent", "redis", "gevent", "subscribed", connection_each=True),
        Mode("many-poll", "redis", "poll", "launched"),
    )
}  # fmt: skip
assert list(MODES) == list(MANY_MODES)


def limit_for(n: int) -> float:
    """The longest any one wait of an N-wait row may take (launch, stores and all)."""
    return 120.0 + n / 100


# -- the benchmark process's side ------------------------------------------------------


def run_many(bench: Bench) -> None:
    """Figure 11: every mode whose backend is selected, at every row, in rounds."""
    modes = [mode for mode in MODES.values() if bench.has(mode.backend)]
    if not modes:
        bench.results.unavailable["many"] = "Not run: neither perkey nor redis is selected."
        return
    sizes = bench.sizes
    rows = sorted(set(sizes.many_waiters))
    bench.results.meta["many_rows"] = rows
    monitor = bench.client(0)
    maxclients = str(monitor.config_get("maxclients")["maxclients"])
    monitor.config_set("maxclients", sizes.many_maxclients)
    try:
        for _ in bench.round_range("many", heavy=True):
            for n in rows:
                for mode in modes:
                    row = f"{mode.name}@{n}"
                    skip = _skipped(bench, mode, n)
                    if skip:
                        bench.results.note(f"many: {row_label(row)}: not run, {skip}.")
                        continue
                    if bench.budget.exhausted:
                        bench.results.note("many: stopped early (time budget).")
                        return
                    try:
                        _row(bench, mode, n)
                    except Exception as exc:
                        bench.results.note(
                            f"many: {row_label(row)} failed: {type(exc).__name__}: "
                            f"{str(exc)[-600:]}"
                        )
    finally:
        monitor.config_set("maxclients", maxclients)


def _skipped(bench: Bench, mode: Mode, n: int) -> str:
    """Why ``mode`` does not run at ``n`` waits (empty: it does)."""
    sizes = bench.sizes
    if mode.kind == "threads" and n > sizes.many_threads:
        return (
            f"a thread per wait runs up to {sizes.many_threads:,} waits "
            "(`--size many_threads=N` raises it)"
        )
    if mode.connection_each and n > sizes.many_per_connection:
        each = "two connections" if mode.backend == "redis" else "a connection"
        return (
            f"{each} per wait runs up to {sizes.many_per_connection:,} waits, the server "
            f"taking {sizes.many_maxclients:,} clients (`--size many_per_connection=N`)"
        )
    return ""


def _row(bench: Bench, mode: Mode, n: int) -> None:
    """One row of one round: the waiting process, the stores, the figures."""
    spec = bench.spec(mode.backend)
    db = spec.redis_db or 0
    bench.client(db).flushdb()
    store_one(bench.app(spec.name), spec, WARM)
    ids = [new_id() for _ in range(n)]
    name = f"bench-many-{uuid.uuid4().hex[:8]}"
    limit = limit_for(n)
    with tempfile.TemporaryDirectory(prefix="perkey-bench-many-") as tmp:
        ids_file, out, log = Path(tmp) / "ids.json", Path(tmp) / "out.json", Path(tmp) / "log"
        ids_file.write_text(json.dumps(ids))
        command = [
            sys.executable, "-m", "benchmarks.waiters", *(["--gevent"] * (mode.kind == "gevent")),
            "--mode", mode.name, "--port", str(bench.port), "--ids", str(ids_file),
            "--name", name, "--out", str(out), "--limit", str(limit),
        ]  # fmt: skip
        with log.open("w") as errors:
            proc = subprocess.Popen(
                command, cwd=ROOT, stdout=subprocess.PIPE, stderr=errors, text=True
            )
        try:
            _launched(proc, limit, log)
            waiting = _until_waiting(bench, mode, spec, ids, name, limit)
            held = _connections(bench, name)
            hold = (now_ns(), now_ns() + int(HOLD * 1e9))
            time.sleep(HOLD)
            held = max(held, _connections(bench, name))
            issued, ended = bench.helper.call(
                "burst", timeout=60 + n * 0.005, backend=spec.name, task_ids=ids
            )
            try:
                proc.wait(limit + QUIET + 30)
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError("the waiting process did not finish") from exc
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"the waiting process failed: {_tail(log)}")
            found = json.loads(out.read_text())
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
    if mode.multiplexed is not None and found["multiplexed"] != mode.multiplexed:
        raise RuntimeError(f"{mode.name}: get() multiplexed={found['multiplexed']}")
    _record(bench, f"{mode.name}@{n}", found, issued, ended, held, hold)
    if waiting < n:
        bench.results.note(
            f"many: {row_label(f'{mode.name}@{n}')}: {waiting:,} of {n:,} waits were seen waiting "
            "before the stores."
        )


def _record(
    bench: Bench,
    row: str,
    found: dict[str, Any],
    issued: Sequence[int],
    ended: int,
    held: int,
    hold: tuple[int, int],
) -> None:
    delivered: list[int | None] = found["delivered"]
    wakes = [d - s for d, s in zip(delivered, issued, strict=True) if d is not None]
    took = ended - issued[0]
    results = bench.results
    results.add("many_connections", row, held)
    results.add("many_failed", row, len(delivered) - len(wakes))
    results.add("many_store", row, took)
    if wakes:
        last = max(d for d in delivered if d is not None)
        results.add("many_ratio", row, (last - issued[0]) / took)
        results.add("many_wake_p50", row, percentile(wakes, 50))
        results.add("many_wake_p99", row, percentile(wakes, 99))
    results.add("many_cpu", row, found["cpu"] * 1e9)
    idle = _idle(found["cpu_samples"], hold)
    if not math.isnan(idle):
        results.add("many_cpu_idle", row, idle * 100)
    if found["errors"]:
        worst = max(found["errors"].items(), key=lambda item: item[1])
        results.note(
            f"many: {row_label(row)}: {len(delivered) - len(wakes):,} waits failed; "
            f"most often ({worst[1]:,}): {worst[0]}"
        )


def _launched(proc: subprocess.Popen[str], limit: float, log: Path) -> None:
    """Wait for the waiting process's ``launched`` line."""
    assert proc.stdout is not None
    end = time.monotonic() + limit
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline().strip()
            if line == "launched":
                return
            raise RuntimeError(f"the waiting process said {line!r}: {_tail(log)}")
        if proc.poll() is not None:
            raise RuntimeError(f"the waiting process exited early: {_tail(log)}")
    raise RuntimeError("the waiting process did not start its waits in time")


def _until_waiting(
    bench: Bench, mode: Mode, spec: BackendSpec, ids: Sequence[str], name: str, limit: float
) -> int:
    """How many waits the server shows waiting, once all do or the count stalls."""
    count = _counter(bench, mode, spec, ids, name)
    seen, grew = 0, time.monotonic()
    end = grew + limit
    while True:
        now = count()
        if now > seen:
            seen, grew = now, time.monotonic()
        if seen >= len(ids) or time.monotonic() - grew > STALL or time.monotonic() > end:
            return seen
        time.sleep(0.1)


def _counter(
    bench: Bench, mode: Mode, spec: BackendSpec, ids: Sequence[str], name: str
) -> Callable[[], int]:
    client = bench.client(spec.redis_db or 0)
    if mode.sign == "registered":
        layout = bench.app("perkey").backend.layout
        keys = [layout.watchers(task_id) for task_id in ids]
        return lambda: _sum_chunks(client, "exists", keys)
    if mode.sign == "blocked":
        return lambda: sum(
            1 for c in client.client_list() if c.get("name") == name and "b" in c.get("flags", "")
        )
    if mode.sign == "subscribed":
        backend = bench.app("redis").backend
        channels = [backend.get_key_for_task(task_id) for task_id in ids]
        return lambda: _sum_chunks(client, "pubsub_numsub", channels)
    return lambda: len(ids)  # the waiting process said every wait has read once


def _sum_chunks(client: redis.Redis, command: str, names: Sequence[Any]) -> int:
    """EXISTS (keys that exist) or PUBSUB NUMSUB (channels with a subscriber) over
    ``names``, 1,000 names a command, in one pipelined round trip."""
    pipe = client.pipeline(transaction=False)
    for start in range(0, len(names), 1000):
        getattr(pipe, command)(*names[start : start + 1000])
    total = 0
    for reply in pipe.execute():
        total += reply if isinstance(reply, int) else sum(1 for _, n in reply if n)
    return total


def _connections(bench: Bench, name: str) -> int:
    """The waiting process's connections: CLIENT LIST entries with its name."""
    return sum(1 for c in bench.client(0).client_list() if c.get("name") == name)


def _idle(samples: Sequence[tuple[int, float]], window: tuple[int, int]) -> float:
    """The waiting process's CPU share (1.0: a core) over ``window`` (ns), from the
    (time, CPU seconds) samples it took every 50 ms."""
    inside = [s for s in samples if window[0] <= s[0] <= window[1]]
    if len(inside) < 2:
        return math.nan
    (t0, c0), (t1, c1) = inside[0], inside[-1]
    return (c1 - c0) / ((t1 - t0) / 1e9)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:] if log.exists() else ""


# -- the waiting process's side --------------------------------------------------------


def cpu_seconds() -> float:
    """This process's user + system CPU seconds so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Deliveries:
    """What the waits of the waiting process give: when each returned, or its error."""

    def __init__(self, n: int, limit: float) -> None:
        self.times: list[int | None] = [None] * n
        self.errors: dict[str, int] = {}
        self.ended = 0
        self.lock = threading.Lock()
        self.last = 0.0
        self.end = time.monotonic() + limit
        self.cpu_start = 0.0
        self.cpu_end: float | None = None
        self.cpu_samples: list[tuple[int, float]] = []

    def sample(self) -> None:
        """Note the time and the CPU used so far (every :data:`SAMPLE` s, meanwhile)."""
        self.cpu_samples.append((now_ns(), cpu_seconds()))

    def deliver(self, index: int) -> None:
        delivered = now_ns()
        with self.lock:
            self.times[index] = delivered
            self.last = time.monotonic()
            self._ended()

    def fail(self, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"[:300]
        with self.lock:
            self.errors[text] = self.errors.get(text, 0) + 1
            self._ended()

    def _ended(self) -> None:
        self.ended += 1
        if self.ended == len(self.times):
            self.cpu_end = cpu_seconds()

    @property
    def done(self) -> bool:
        """Every wait ended, or nothing arrived for :data:`QUIET` s, or the limit passed."""
        now = time.monotonic()
        quiet = self.last and now - self.last > QUIET
        return self.ended >= len(self.times) or bool(quiet) or now > self.end

    def started(self) -> None:
        """Every wait has started: say so to the benchmark process."""
        sys.stdout.write("launched\n")
        sys.stdout.flush()

    def report(self) -> dict[str, Any]:
        unfinished = len(self.times) - self.ended
        errors = dict(self.errors)
        if unfinished:
            errors["still waiting when the process gave up"] = unfinished
        cpu_end = self.cpu_end if self.cpu_end is not None else cpu_seconds()
        return {
            "delivered": self.times,
            "errors": errors,
            "cpu": cpu_end - self.cpu_start,
            "cpu_samples": self.cpu_samples,
        }


def _get(app: Celery, index: int, task_id: str, into: Deliveries, limit: float) -> None:
    """One plain ``get()`` (a thread's or a greenlet's)."""
    try:
        value = app.AsyncResult(task_id).get(timeout=limit)
    except Exception as exc:
        into.fail(exc)
        return
    _delivered(into, index, value)


def _delivered(into: Deliveries, index: int, value: Any) -> None:
    """Count a wait's return: a delivery, or a failure if it returned the wrong value."""
    if value == VALUE:
        into.deliver(index)
    else:
        into.fail(AssertionError(f"wrong value {value!r}"))


def _wait_threads(app: Celery, ids: Sequence[str], into: Deliveries, limit: float) -> None:
    old = threading.stack_size(THREAD_STACK)
    into.cpu_start = cpu_seconds()
    try:
        for index, task_id in enumerate(ids):
            threading.Thread(
                target=_get, args=(app, index, task_id, into, limit), daemon=True
            ).start()
    finally:
        threading.stack_size(old)
    into.started()
    while not into.done:
        into.sample()
        time.sleep(SAMPLE)


def _wait_gevent(app: Celery, ids: Sequence[str], into: Deliveries, limit: float) -> None:
    import gevent

    into.cpu_start = cpu_seconds()
    for index, task_id in enumerate(ids):
        gevent.spawn(_get, app, index, task_id, into, limit)
    gevent.sleep(0)  # every greenlet runs until its wait blocks
    into.started()
    while not into.done:
        into.sample()
        gevent.sleep(SAMPLE)


async def _hold(into: Deliveries, tasks: list[asyncio.Future[None]]) -> None:
    """Say the waits started, sample the CPU until every one has ended, then cancel any
    still running."""
    into.started()
    while not into.done:
        into.sample()
        await asyncio.sleep(SAMPLE)
    for task in tasks:
        task.cancel()


def _wait_aio(app: Celery, ids: Sequence[str], into: Deliveries, limit: float) -> None:
    from celery_perkey_backend import aio

    async def one(index: int, task_id: str) -> None:
        try:
            value = await aio.wait(app.AsyncResult(task_id), timeout=limit)
        except Exception as exc:
            into.fail(exc)
            return
        _delivered(into, index, value)

    async def main() -> None:
        await aio.wait(app.AsyncResult(WARM), timeout=GET_TIMEOUT)
        into.cpu_start = cpu_seconds()
        tasks = [asyncio.ensure_future(one(i, task_id)) for i, task_id in enumerate(ids)]
        await asyncio.sleep(0)  # every task runs until its wait awaits
        await _hold(into, tasks)

    asyncio.run(main())


def _wait_poll(
    app: Celery, port: int, db: int, name: str, ids: Sequence[str], into: Deliveries, limit: float
) -> None:
    """GET the redis:// key, decode, ``asyncio.sleep(POLL_PAUSE)``, again: what the
    asyncio wrappers of Celery's results do, on redis-py's asyncio client with a pool of
    at most :data:`POLL_CONNECTIONS` connections (unbounded, it would open one per GET
    in flight)."""
    import redis.asyncio

    backend = app.backend
    ready = states.READY_STATES

    async def main() -> None:
        pool = redis.asyncio.BlockingConnectionPool(
            host="127.0.0.1", port=port, db=db, max_connections=POLL_CONNECTIONS,
            client_name=name, timeout=None,
        )  # fmt: skip
        client = redis.asyncio.Redis(connection_pool=pool)
        first = {"left": len(ids)}
        read_once = asyncio.Event()

        def has_read() -> None:
            first["left"] -= 1
            if first["left"] == 0:
                read_once.set()

        async def one(index: int, task_id: str) -> None:
            key = backend.get_key_for_task(task_id)
            end = time.monotonic() + limit
            reads = 0
            try:
                while True:
                    raw = await client.get(key)
                    meta = backend.decode_result(raw) if raw is not None else None
                    if meta is not None and meta["status"] in ready:
                        if meta["result"] != VALUE:
                            raise AssertionError(f"wrong value {meta['result']!r}")
                        into.deliver(index)
                        return
                    reads += 1
                    if reads == 1:
                        has_read()
                    if time.monotonic() > end:
                        raise TimeoutError(f"no result within {limit:.0f} s")
                    await asyncio.sleep(POLL_PAUSE)
            except Exception as exc:
                if reads == 0:
                    has_read()
                into.fail(exc)

        await client.get(backend.get_key_for_task(WARM))
        into.cpu_start = cpu_seconds()
        tasks = [asyncio.ensure_future(one(i, task_id)) for i, task_id in enumerate(ids)]
        await read_once.wait()
        await _hold(into, tasks)
        await client.aclose()

    asyncio.run(main())


def child_main(argv: Sequence[str]) -> int:
    """The waiting process (see :mod:`.waiters`): N waits of one mode, then a JSON file."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.waiters")
    parser.add_argument("--gevent", action="store_true", help="patched by .waiters")
    parser.add_argument("--mode", choices=list(MODES), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ids", type=Path, required=True, help="a JSON list of task ids")
    parser.add_argument("--name", required=True, help="the client name of every connection")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=float, required=True)
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    ids: list[str] = json.loads(args.ids.read_text())
    with tempfile.TemporaryDirectory(prefix="perkey-bench-waiters-") as tmp:
        spec = build_specs(args.port, Path(tmp), [mode.backend])[0]
    app = make_app(spec, redis_client_name=args.name, **dict(mode.conf))
    # A stored result, waited for through the same path first: imports, pools and the
    # multiplexer's threads are ready before the first of the N waits starts.
    if mode.kind in ("threads", "gevent"):
        app.AsyncResult(WARM).get(timeout=GET_TIMEOUT)
    into = Deliveries(len(ids), args.limit)
    if mode.kind == "aio":
        _wait_aio(app, ids, into, args.limit)
    elif mode.kind == "poll":
        _wait_poll(app, args.port, spec.redis_db or 0, args.name, ids, into, args.limit)
    elif mode.kind == "gevent":
        _wait_gevent(app, ids, into, args.limit)
    else:
        _wait_threads(app, ids, into, args.limit)
    found = into.report()
    waiter = getattr(app.backend, "waiter", None)
    found["multiplexed"] = None if waiter is None else bool(waiter.multiplex)
    args.out.write_text(json.dumps(found))
    sys.stdout.flush()
    # Waits still blocked (a failed row) and their threads would hold up a normal exit.
    os._exit(0)
