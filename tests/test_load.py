"""Real `celery worker` subprocesses: a worker killed mid-task, and load with many waiters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import group, states

from .conftest import stop_process, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _worker(server: Any, extra_env: dict[str, str], *options: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PERKEY_TEST_PORT=str(server.port), **extra_env)
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.worker_app", "worker", "--loglevel=WARNING",
         "--without-gossip", "--without-mingle", "--without-heartbeat", *options],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip


@pytest.fixture
def worker_app(server: Any, r: redis.Redis) -> Iterator[Any]:
    os.environ["PERKEY_TEST_PORT"] = str(server.port)
    from tests import worker_app

    yield worker_app
    r.flushall()


def test_a_worker_killed_mid_task(server: Any, r: redis.Redis, worker_app: Any) -> None:
    """With task_acks_late, the redelivered run's result lands once.

    Meanwhile a waiter sees STARTED (from the killed run) and goes on waiting; the
    result key does not exist until the second run stores it.
    """
    first = _worker(server, {"PERKEY_TEST_ACKS_LATE": "1"}, "--pool=solo")
    result = worker_app.slow.delay(4, "survived")
    deadline = time.monotonic() + 30
    while result.state != states.STARTED:
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    assert not r.exists(worker_app.app.backend.layout.result(result.id))
    seen: list[str] = []
    waiter = threading.Thread(
        target=lambda: seen.append(result.get(timeout=60, on_message=lambda m: None))
    )
    waiter.start()
    # A new worker takes the message back as it starts, once the message's visibility
    # timeout (2 s, tests/worker_app.py) has passed.
    broker = redis.Redis(port=server.port, db=1)
    wait_until(lambda: _visible_again(broker, 2.0), "the unacked message is visible again")
    second = _worker(server, {"PERKEY_TEST_ACKS_LATE": "1"}, "--pool=solo")
    try:
        waiter.join(60)
    finally:
        stop_process(second)
    assert seen == ["survived"]
    assert r.llen(worker_app.app.backend.layout.result(result.id)) == 1


def _visible_again(broker: redis.Redis, visibility_timeout: float) -> bool:
    """Whether every unacknowledged message of kombu's Redis transport is past its
    visibility timeout (the sorted set holds their delivery times)."""
    delivered = broker.zrange("unacked_index", 0, -1, withscores=True)
    return all(when + visibility_timeout < time.time() for _, when in delivered)


def _load(
    server: Any,
    r: redis.Redis,
    app: Any,
    tasks: int,
    clients: int,
    extra_env: dict[str, str],
    check: Callable[[redis.Redis, int], None],
) -> str:
    workers = [_worker(server, extra_env, "--pool=prefork", "--concurrency=2") for _ in range(2)]
    start_keys = r.dbsize()
    received: list[Counter[int]] = [Counter() for _ in range(clients)]
    errors: list[BaseException] = []
    per_client = tasks // clients
    chunk = 500

    def client(index: int) -> None:
        try:
            base = index * per_client
            for offset in range(0, per_client, chunk):
                numbers = range(base + offset, base + min(offset + chunk, per_client))
                job = group(app.signature("w.mul", args=(n, 1)) for n in numbers).apply_async()
                for value in job.get(timeout=300):
                    received[index][value] += 1
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
    finally:
        for proc in workers:
            stop_process(proc)
    elapsed = time.monotonic() - started
    assert errors == []
    for index, counts in enumerate(received):
        expected = range(index * per_client, (index + 1) * per_client)
        assert counts == Counter(expected), f"client {index} lost or duplicated results"
    check(r, start_keys)
    mode = "read-once" if extra_env else "rotation"
    line = (
        f"| {mode} | {clients * per_client} | {clients} | {elapsed:.1f} s "
        f"| {clients * per_client / elapsed:,.0f} tasks/s |"
    )
    print(f"\nload: {line}")
    return line


def _all_have_ttl(r: redis.Redis, _start: int) -> None:
    # -1 is a key without a TTL; -2, one that expired between SCAN and PTTL.
    assert all(r.pttl(key) != -1 for key in r.scan_iter(count=1000))


def _back_to_start(r: redis.Redis, start: int) -> None:
    _all_have_ttl(r, start)
    assert r.dbsize() == start


@pytest.mark.parametrize(("tasks", "clients"), [(2000, 4)])
def test_load_scaled_down(
    server: Any, r: redis.Redis, worker_app: Any, tasks: int, clients: int
) -> None:
    _load(server, r, worker_app.app, tasks, clients, {}, _all_have_ttl)


def test_load_read_once_leaves_nothing(server: Any, r: redis.Redis, make_app: Any) -> None:
    app = make_app(perkey_read_once=True)
    _load(server, r, app, 1000, 2, {"PERKEY_TEST_READ_ONCE": "1"}, _back_to_start)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_load_100k(server: Any, r: redis.Redis, worker_app: Any, make_app: Any) -> None:
    lines = [_load(server, r, worker_app.app, 100_000, 8, {}, _all_have_ttl)]
    r.flushall()
    once = make_app(perkey_read_once=True)
    lines.append(_load(server, r, once, 100_000, 8, {"PERKEY_TEST_READ_ONCE": "1"}, _back_to_start))
    # `python3 dev.py load` runs this test and adds the lines to docs/reliability.md;
    # the test itself writes no tracked file.
    report = os.environ.get("PERKEY_LOAD_REPORT")
    if report:
        Path(report).write_text("\n".join(lines) + "\n")
