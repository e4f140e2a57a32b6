"""The app a ``celery worker`` subprocess of the end-to-end figure runs.

Configured entirely from ``$PERKEY_BENCH_WORKER`` (JSON: broker, backend, queue, conf),
so that one module serves every backend under test.
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery

_config: dict[str, Any] = json.loads(os.environ.get("PERKEY_BENCH_WORKER", "{}"))

app = Celery("bench_worker")
app.conf.update(
    broker_url=_config.get("broker", "memory://"),
    result_backend=_config.get("backend"),
    task_default_queue=_config.get("queue", "celery"),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
)
app.conf.update(_config.get("conf", {}))


@app.task(name="bench.echo")
def echo(value: Any) -> Any:
    return value
