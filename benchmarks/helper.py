"""The other process: it stores results while the benchmark process waits for them.

Started once per run (multiprocessing, spawn) with the backend definitions. It takes
one command at a time over a pipe and answers with timestamps taken on
CLOCK_MONOTONIC, the clock the waiting process reads too.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.synchronize
import time
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery

from .common import (
    BackendSpec,
    blocked_waiters,
    close_app,
    make_app,
    now_ns,
    percentile,
    raw_client,
    store_one,
    wait_until,
)

#: The helper exits by itself when the parent says nothing for this long.
IDLE_EXIT = 1800.0

#: The longest a helper waits to see a waiter wait before it stores anyway.
PROBE_LIMIT = 5.0


class _Worker:
    def __init__(
        self, specs: Sequence[BackendSpec], port: int, cluster_ports: Sequence[int] = ()
    ) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.port = port
        self.cluster_ports = tuple(cluster_ports)
        self.apps: dict[str, Celery] = {}
        self.raw: dict[int, redis.Redis] = {}
        self.monitor = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
        # On a cluster a waiter blocks on the primary of its key: watch every primary.
        self.monitors = [
            redis.Redis(host="127.0.0.1", port=p, socket_timeout=10) for p in self.cluster_ports
        ] or [self.monitor]

    def app(self, name: str) -> Celery:
        if name not in self.apps:
            self.apps[name] = make_app(self.specs[name])
        return self.apps[name]

    def client(self, db: int) -> redis.Redis:
        if db not in self.raw:
            self.raw[db] = raw_client(self.port, self.cluster_ports, db, 10)
        return self.raw[db]

    def blocked(self) -> int:
        return sum(blocked_waiters(m) for m in self.monitors)

    def warm(self) -> None:
        for name, spec in self.specs.items():
            if spec.is_raw:
                self.client(spec.redis_db or 0).ping()
            else:
                store_one(self.app(name), spec, f"warm-{name}", reply_to="bench-nowhere")
        self.monitor.ping()

    def store(self, name: str, task_id: str, reply_to: str | None) -> None:
        spec = self.specs[name]
        if spec.is_raw:
            self.client(spec.redis_db or 0).lpush(task_id, b"x" * 100)
        else:
            store_one(self.app(name), spec, task_id, reply_to)

    def wait_for_waiter(self, probe: str, need: int, channel: str, db: int = 0) -> bool:
        """Whether the waiter was seen waiting (``False``: stored anyway after a limit).

        ``registered``: a multiplexed wait, seen when its task's watchers key
        (``channel``, in ``db``) exists.
        """
        if probe == "blocked":
            return wait_until(lambda: self.blocked() >= need, PROBE_LIMIT)
        if probe == "subscribed":
            return wait_until(
                lambda: int(self.monitor.pubsub_numsub(channel)[0][1]) >= need, PROBE_LIMIT
            )
        if probe == "registered":
            client = self.client(db)
            return wait_until(lambda: bool(client.exists(channel)), PROBE_LIMIT)
        return True

    def wake(self, args: dict[str, Any]) -> tuple[int, bool]:
        """Wait ``delay``, see the waiter wait, then store; the time of issuing the store."""
        time.sleep(float(args.get("delay", 0.0)))
        seen = self.wait_for_waiter(
            args["probe"], int(args.get("need", 1)), args.get("channel", ""), args.get("db", 0)
        )
        issued = now_ns()
        self.store(args["backend"], args["task_id"], args.get("reply_to"))
        return issued, seen

    def arrive(self, args: dict[str, Any]) -> tuple[int, int, bool]:
        """Store every id in turn; when the first and the last store were issued."""
        time.sleep(float(args.get("delay", 0.0)))
        seen = self.wait_for_waiter(
            args["probe"], int(args.get("need", 1)), args.get("channel", "")
        )
        ids: list[str] = args["task_ids"]
        first = last = now_ns()
        for task_id in ids:
            last = now_ns()
            self.store(args["backend"], task_id, args.get("reply_to"))
        return first, last, seen

    def burst(self, args: dict[str, Any]) -> tuple[list[int], int]:
        """Store every id in turn, as fast as one process can: when each store was
        issued, and when the last one returned."""
        issued = []
        for task_id in args["task_ids"]:
            issued.append(now_ns())
            self.store(args["backend"], task_id, None)
        return issued, now_ns()

    def probe(self, limit: float, stop: multiprocessing.synchronize.Event) -> dict[str, float]:
        """PING in a loop until ``stop`` is set (at most ``limit`` s); latency percentiles."""
        client = self.monitor
        samples: list[int] = []
        end = time.monotonic() + limit
        while not stop.is_set() and time.monotonic() < end:
            start = now_ns()
            client.ping()
            samples.append(now_ns() - start)
        return {
            "count": float(len(samples)),
            "p50": percentile(samples, 50),
            "p99": percentile(samples, 99),
            "max": float(max(samples)) if samples else float("nan"),
        }

    def close(self) -> None:
        for app in self.apps.values():
            close_app(app)
        for client in [*self.raw.values(), *self.monitors, self.monitor]:
            client.close()


def helper_main(
    conn: multiprocessing.connection.Connection,
    specs: Sequence[BackendSpec],
    port: int,
    stop: multiprocessing.synchronize.Event,
    cluster_ports: Sequence[int] = (),
) -> None:
    worker = _Worker(specs, port, cluster_ports)
    try:
        while conn.poll(IDLE_EXIT):
            command, args = conn.recv()
            if command == "quit":
                break
            try:
                if command == "warm":
                    worker.warm()
                    reply: Any = None
                elif command == "wake":
                    reply = worker.wake(args)
                elif command == "arrive":
                    reply = worker.arrive(args)
                elif command == "burst":
                    reply = worker.burst(args)
                elif command == "probe":
                    reply = worker.probe(float(args["limit"]), stop)
                else:
                    raise ValueError(f"unknown command {command!r}")
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
            else:
                conn.send(("ok", reply))
    finally:
        with contextlib.suppress(Exception):
            worker.close()


class Helper:
    """The benchmark process's handle on the helper process.

    ``cluster_ports``: the primaries of a Redis Cluster, for backends that run on one.
    """

    def __init__(
        self, specs: Sequence[BackendSpec], port: int, cluster_ports: Sequence[int] = ()
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.stop_event = ctx.Event()
        self.process = ctx.Process(
            target=helper_main,
            args=(child, list(specs), port, self.stop_event, tuple(cluster_ports)),
            daemon=True,
        )
        self.process.start()
        child.close()
        self.call("warm", timeout=60)

    def send(self, command: str, **args: Any) -> None:
        self.conn.send((command, args))

    def receive(self, timeout: float) -> Any:
        """The answer to the last command.

        Raises
        ------
        TimeoutError
            If no answer comes within ``timeout`` seconds.
        RuntimeError
            If the command failed in the helper.
        """
        if not self.conn.poll(timeout):
            raise TimeoutError(f"the helper process did not answer within {timeout:.0f} s")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"helper: {value}")
        return value

    def call(self, command: str, timeout: float = 60.0, **args: Any) -> Any:
        self.send(command, **args)
        return self.receive(timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("quit")
        self.process.join(15)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        self.conn.close()
