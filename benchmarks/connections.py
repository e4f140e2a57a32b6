"""Figure 8: Redis connections one client process holds while N threads each wait on a
different result.

Each round's app gets a client name of its own (``redis_client_name``), which every
connection it opens carries, so CLIENT LIST counts exactly this app's connections.
"""

from __future__ import annotations

import gc
import threading
import time
import uuid

from .common import (
    GET_TIMEOUT,
    VALUE,
    BackendSpec,
    close_app,
    make_app,
    new_id,
    store_one,
    wait_until,
)
from .context import Bench

#: Backends whose waiters hold Redis connections.
REDIS_BACKENDS = ("perkey", "perkey-once", "redis")


def _count(bench: Bench, name: str) -> int:
    return sum(1 for client in bench.client(0).client_list() if client.get("name") == name)


def _held(bench: Bench, spec: BackendSpec, n: int) -> tuple[int, int]:
    """Connections named for this app while ``n`` threads wait, and server-side blocked
    clients (perkey) or subscribed channels (redis://) at that moment."""
    name = f"bench-conn-{uuid.uuid4().hex[:8]}"
    app = make_app(spec, redis_client_name=name)
    monitor = bench.client(0)
    ids = [new_id() for _ in range(n)]
    errors: list[BaseException] = []
    entered = threading.Semaphore(0)

    def waiter(task_id: str) -> None:
        entered.release()
        try:
            if app.AsyncResult(task_id).get(timeout=GET_TIMEOUT * 2) != VALUE:
                raise AssertionError("wrong value")
        except BaseException as exc:
            errors.append(exc)

    blocked_before = bench.blocked_clients()
    old_stack = threading.stack_size(512 * 1024)
    try:
        threads = [threading.Thread(target=waiter, args=(tid,), daemon=True) for tid in ids]
        for thread in threads:
            thread.start()
    finally:
        threading.stack_size(old_stack)
    for _ in range(n):
        entered.acquire(timeout=GET_TIMEOUT)
    if spec.probe == "blocked":
        waiting = wait_until(
            lambda: bench.blocked_clients() >= blocked_before + n,
            GET_TIMEOUT,
            pause=0.01,
        )
    else:
        channels = [app.backend.get_key_for_task(tid) for tid in ids]
        waiting = wait_until(
            lambda: all(count >= 1 for _, count in monitor.pubsub_numsub(*channels)),
            GET_TIMEOUT,
            pause=0.01,
        )
    time.sleep(0.2)  # let anything still connecting finish
    held = _count(bench, name)
    if spec.probe == "blocked":
        server_side = bench.blocked_clients() - blocked_before
    else:
        server_side = len(monitor.pubsub_channels("celery-task-meta-*"))
    for task_id in ids:
        store_one(app, spec, task_id)
    deadline = time.monotonic() + GET_TIMEOUT * 2
    for thread in threads:
        thread.join(max(0.1, deadline - time.monotonic()))
    alive = sum(thread.is_alive() for thread in threads)
    gc.collect()  # the finished threads' own backends (and redis://'s pub/sub) go
    if spec.name != "redis":
        # perkey's pools are per URL and settings, so this app's name has a pool of its own.
        app.backend.client.connection_pool.disconnect()
    close_app(app)
    if not waiting or errors or alive:
        raise RuntimeError(
            f"connections/{spec.name}: waiting={waiting}, errors={errors[:3]!r}, "
            f"threads still alive={alive}"
        )
    return held, server_side


def run_connections(bench: Bench) -> None:
    n = bench.sizes.threads
    specs = [spec for spec in bench.specs if spec.name in REDIS_BACKENDS]
    bench.results.meta["connection_threads"] = n
    for _ in bench.round_range("connections", heavy=True):
        for spec in specs:
            held, server_side = _held(bench, spec, n)
            bench.results.add("connections", spec.name, held)
            bench.results.add("connections_server", spec.name, server_side)
