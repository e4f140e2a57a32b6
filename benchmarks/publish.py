"""Figure 5: how fast ``apply_async`` publishes with each result backend configured.

The broker is Redis on the private server (db 3) and no worker runs, so only the
client's side is measured: kombu's publish plus whatever the result backend does per
task (``redis://`` subscribes to the task's channel, ``rpc://`` declares its reply
queue, the others nothing). rpc:// needs an AMQP broker: its rows use RabbitMQ.
"""

from __future__ import annotations

import contextlib
import gc
import time
import uuid
from typing import Any

from celery import Celery

from .common import VALUE, close_app, make_app
from .context import Bench

WARMUP = 20


def delete_queue(app: Celery, queue: str) -> None:
    with contextlib.suppress(Exception), app.connection_for_write() as conn:
        conn.default_channel.queue_delete(queue)


def run_publish(bench: Bench) -> None:
    n = bench.sizes.publish
    for _ in bench.round_range("publish"):
        for spec in bench.celery_specs:
            queue = f"bench.publish.{uuid.uuid4().hex[:8]}"
            app = make_app(spec, queue=queue)
            task = app.tasks["bench.echo"]
            try:
                held: list[Any] = [task.apply_async((VALUE,)) for _ in range(WARMUP)]
                gc.collect()
                start = time.perf_counter_ns()
                for _ in range(n):
                    held.append(task.apply_async((VALUE,)))
                elapsed = time.perf_counter_ns() - start
                bench.results.add("publish", spec.name, n / (elapsed / 1e9))
                del held
            finally:
                delete_queue(app, queue)
                close_app(app)
