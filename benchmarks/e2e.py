"""Figure 6: end to end through a real ``celery worker`` subprocess.

One worker per backend (``--pool``, default prefork with 2 processes, one per core),
each on a queue of its own on the Redis broker of the private server (rpc:// on
RabbitMQ), all started before the first round so that the rounds can alternate.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO

from celery import Celery, group

from .common import GET_TIMEOUT, ROOT, VALUE, BackendSpec, close_app, make_app, median
from .context import Bench
from .publish import delete_queue

#: How long a worker may take to answer its first task.
START_LIMIT = 90.0


class WorkerProcess:
    """A ``celery worker`` subprocess for one backend, logging to a file."""

    def __init__(self, spec: BackendSpec, queue: str, pool: str, logfile: Path) -> None:
        self.spec = spec
        self.queue = queue
        self.pool = pool
        self.logfile = logfile
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        config = {
            "broker": self.spec.broker,
            "backend": self.spec.url,
            "queue": self.queue,
            "conf": dict(self.spec.conf),
        }
        env = dict(os.environ, PERKEY_BENCH_WORKER=json.dumps(config))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self._log = self.logfile.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "benchmarks.worker_app", "worker",
             f"--pool={self.pool}", "--concurrency=2", "-Q", self.queue,
             "-n", f"bench-{self.spec.name}-{uuid.uuid4().hex[:6]}@%h",
             "--loglevel=WARNING", "--without-gossip", "--without-mingle",
             "--without-heartbeat"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.logfile.read_text(errors="replace")[-1500:]
        return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._log is not None:
            self._log.close()


def _sequential(app: Celery, n: int) -> list[float]:
    task = app.tasks["bench.echo"]
    samples = []
    for _ in range(n):
        start = time.perf_counter_ns()
        value = task.delay(VALUE).get(timeout=GET_TIMEOUT)
        samples.append(time.perf_counter_ns() - start)
        if value != VALUE:
            raise AssertionError(f"worker returned {value!r}")
    return samples


def _burst(app: Celery, n: int) -> float:
    """Tasks per second for ``n`` tasks published as a group and gathered."""
    task = app.tasks["bench.echo"]
    gc.collect()
    start = time.perf_counter_ns()
    values = group(task.s(VALUE) for _ in range(n)).apply_async().get(timeout=max(120.0, n / 10))
    elapsed = time.perf_counter_ns() - start
    if len(values) != n:
        raise AssertionError(f"gathered {len(values)} of {n}")
    return n / (elapsed / 1e9)


def run_e2e(bench: Bench) -> None:
    specs = bench.celery_specs
    workers: dict[str, WorkerProcess] = {}
    apps: dict[str, Celery] = {}
    bench.results.meta["worker_pool"] = f"{bench.pool}, concurrency 2"
    try:
        for spec in specs:
            queue = f"bench.e2e.{spec.name}.{uuid.uuid4().hex[:8]}"
            apps[spec.name] = make_app(spec, queue=queue)
            workers[spec.name] = WorkerProcess(
                spec, queue, bench.pool, bench.workdir / f"worker-{spec.name}.log"
            )
            workers[spec.name].start()
        ready: list[BackendSpec] = []
        for spec in specs:
            try:
                apps[spec.name].tasks["bench.echo"].delay("ping").get(timeout=START_LIMIT)
            except Exception as exc:
                bench.results.note(
                    f"e2e: the {spec.name} worker did not answer ({type(exc).__name__}: {exc}); "
                    f"log: {workers[spec.name].log_tail()!r}"
                )
            else:
                ready.append(spec)
        for _ in bench.round_range("e2e sequential"):
            for spec in ready:
                n = (
                    bench.sizes.e2e_sequential_polling
                    if spec.polling
                    else bench.sizes.e2e_sequential
                )
                samples = _sequential(apps[spec.name], n)
                bench.results.add("e2e_sequential", spec.name, median(samples))
                bench.results.add_samples("e2e_sequential", spec.name, samples)
        for _ in bench.round_range("e2e burst", heavy=True):
            for spec in ready:
                bench.results.add(
                    "e2e_burst", spec.name, _burst(apps[spec.name], bench.sizes.burst)
                )
    finally:
        for worker in workers.values():
            worker.stop()
        for spec in specs:
            if spec.name in apps:
                delete_queue(apps[spec.name], workers[spec.name].queue)
                close_app(apps[spec.name])
