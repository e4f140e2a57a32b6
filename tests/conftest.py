"""Fixtures: real servers on private ports, Celery apps wired to them, real workers."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.bin.base import CLIContext
from celery.contrib.testing.worker import start_worker
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families

from celery_perkey_backend import multiplex
from celery_perkey_backend.cli import perkey
from celery_perkey_backend.testing import EmbeddedServer

#: The plugin users load (``perkey_server``, ``perkey_url``, and Celery's own fixtures),
#: and pytester to test it the way a user's project loads it.
pytest_plugins = ["pytester", "celery_perkey_backend.testing"]

_app_names = itertools.count()

#: The RESP version the backend's URLs ask redis-py for (``?protocol=``), when set
#: (``dev.py matrix`` runs the core tests under both); redis-py's default otherwise.
PROTOCOL = os.environ.get("PERKEY_PROTOCOL")


def with_protocol(url: str) -> str:
    """``url`` asking for :data:`PROTOCOL`, if it is a perkey URL that names no protocol
    and one is set."""
    if not PROTOCOL or not url.startswith("perkey") or "protocol=" in url:
        return url
    return f"{url}{'&' if '?' in url else '?'}protocol={PROTOCOL}"


@pytest.fixture(scope="session")
def server(perkey_server: EmbeddedServer) -> EmbeddedServer:
    """One server for the session (the plugin's); a test that cannot start it fails."""
    return perkey_server


@pytest.fixture
def r(server: EmbeddedServer) -> Iterator[redis.Redis]:
    """A plain client on db 0, the backend's db, emptied before each test."""
    client = redis.Redis(port=server.port, db=0)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def backend_url(server: EmbeddedServer) -> str:
    return with_protocol(f"perkey://127.0.0.1:{server.port}/0")


@pytest.fixture(scope="session")
def perkey_url(perkey_url: str) -> str:
    """The plugin's ``perkey_url``, asking for :data:`PROTOCOL`."""
    return with_protocol(perkey_url)


@pytest.fixture
def make_app(server: EmbeddedServer, r: redis.Redis) -> Callable[..., Celery]:
    """Build a Celery app using perkey:// on the test server and a Redis broker (db 1)."""

    def factory(backend: str | None = None, **conf: Any) -> Celery:
        app = Celery(f"perkey_test_{next(_app_names)}", set_as_current=False)
        app.conf.update(
            broker_url=f"redis://127.0.0.1:{server.port}/1",
            result_backend=with_protocol(backend or f"perkey://127.0.0.1:{server.port}/0"),
            task_track_started=True,
            broker_connection_retry_on_startup=True,
            worker_hijack_root_logger=False,
        )
        app.conf.update(conf)
        register_tasks(app)
        return app

    return factory


@pytest.fixture
def app(make_app: Callable[..., Celery]) -> Celery:
    return make_app()


@pytest.fixture
def worker(app: Celery) -> Iterator[Any]:
    with running_worker(app) as w:
        yield w


@pytest.fixture
def own() -> Iterator[EmbeddedServer]:
    """A server of its own: a fresh multiplexer, whose checks run at once."""
    with EmbeddedServer() as srv:
        yield srv


@pytest.fixture
def fast_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The multiplexer's checks every 0.3 s instead of 5 s: each reads every waited task
    in one batch, and the tests need not wait that long."""
    monkeypatch.setattr(multiplex, "CHECK_INTERVAL", 0.3)


class Waiting:
    """A wait running in a thread, its outcome (value or exception) collected."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.outcome: list[Any] = []

        def run() -> None:
            try:
                self.outcome.append(call())
            except BaseException as exc:
                self.outcome.append(exc)

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def result(self, timeout: float = 30) -> Any:
        self.thread.join(timeout)
        assert self.outcome, "the wait did not end"
        return self.outcome[0]


def timed(call: Callable[[], object]) -> tuple[BaseException | None, float]:
    """What ``call`` raised (``None`` if nothing), and how long it took."""
    started = time.monotonic()
    try:
        call()
    except BaseException as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def wait_until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def wait_for_blocked_clients(r: redis.Redis, count: int, timeout: float = 10.0) -> None:
    """Wait until at least ``count`` clients of ``r``'s server sit in a blocking command."""
    wait_until(
        lambda: r.info("clients")["blocked_clients"] >= count,
        f"{count} clients are blocked",
        timeout,
    )


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """Stop a subprocess started in its own session (a ``celery worker``), and its
    children: TERM, then KILL if it takes longer than 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGCONT)  # in case a test stopped it
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def run_cli(app: Any, *args: str) -> Result:
    """The command as ``celery -A app perkey …`` runs it, in this process."""
    context = CLIContext(app=app, no_color=True, workdir=None)
    return CliRunner().invoke(perkey, list(args), obj=context, catch_exceptions=False)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, by name and labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float | None:
    """One sample of a Prometheus text exposition; None if it is not there."""
    return samples(text).get((name, tuple(sorted(labels.items()))))


#: A script for ``python -c``: read one result (``argv[2]``) from a backend URL
#: (``argv[1]``) in a process of its own, and print its repr.
READER = """
import sys
from celery import Celery
app = Celery("reader", backend=sys.argv[1])
print(repr(app.AsyncResult(sys.argv[2]).get(timeout=15)))
"""


def command_calls(r: redis.Redis) -> Counter[str]:
    """How often the server ran each command (INFO commandstats), inside scripts too."""
    stats = r.info("commandstats")
    return Counter({k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()})


class Boom(Exception):
    """A custom exception that must come back as its own type."""


def register_tasks(app: Celery) -> None:
    """The tasks every test app knows, defined per app so apps never share state."""

    @app.task(shared=False, name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(shared=False, name="t.tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    @app.task(shared=False, name="t.echo")
    def echo(value: Any) -> Any:
        return value

    @app.task(shared=False, name="t.sleep")
    def sleep(seconds: float, value: Any = None) -> Any:
        time.sleep(seconds)
        return value

    @app.task(shared=False, name="t.fail")
    def fail(message: str = "boom") -> None:
        raise Boom(message)

    @app.task(shared=False, name="t.fail_later")
    def fail_later(seconds: float, message: str = "boom") -> None:
        time.sleep(seconds)
        raise Boom(message)

    @app.task(shared=False, name="t.keyerror")
    def keyerror() -> None:
        raise KeyError("missing")

    @app.task(shared=False, name="t.progress", bind=True)
    def progress(self: Any, steps: int, pause: float = 0.05) -> str:
        for step in range(steps):
            self.update_state(state="PROGRESS", meta={"step": step, "of": steps})
            time.sleep(pause)
        return "finished"

    @app.task(shared=False, name="t.retry_once", bind=True, max_retries=3, default_retry_delay=0.1)
    def retry_once(self: Any, go_key: str | None = None) -> str:
        if self.request.retries == 0:
            if go_key:
                # Retry only once the test says its waiter follows the states.
                self.app.backend.client.blpop(go_key, timeout=10)
            raise self.retry(countdown=0.1)
        return f"retried {self.request.retries}"

    @app.task(shared=False, name="t.spawn", bind=True)
    def spawn(self: Any, n: int) -> int:
        for i in range(n):
            add.delay(i, i)
        return n

    @app.task(shared=False, name="t.grow", bind=True)
    def grow(self: Any, value: int) -> int:
        self.add_to_chord(add.s(value, value))
        return value

    @app.task(shared=False, name="t.quiet", ignore_result=True)
    def quiet() -> str:
        return "nobody reads this"


def running_worker(app: Celery, **kwargs: Any) -> Any:
    """An in-process worker (``celery.contrib.testing``) on a thread pool."""
    options: dict[str, Any] = {"pool": "threads", "concurrency": 4, "perform_ping_check": False}
    options.update(kwargs)
    return start_worker(app, **options)
