"""An ordinary Celery app that uses perkey:// by configuration alone.

The only line that concerns this project is ``result_backend``; everything else is
plain Celery. ``examples/run.py`` starts a private server and a worker for it.
"""

from __future__ import annotations

import os
import time

from celery import Celery

SERVER = os.environ.get("EXAMPLE_REDIS", "127.0.0.1:6379")

app = Celery("example")
app.conf.update(
    broker_url=f"redis://{SERVER}/1",
    result_backend=f"perkey://{SERVER}/0",
    result_expires=3600,
    task_track_started=True,
    broker_connection_retry_on_startup=True,
)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def total(values: list[int]) -> int:
    return sum(values)


@app.task(bind=True)
def crunch(self, steps: int) -> str:  # type: ignore[no-untyped-def]
    for step in range(1, steps + 1):
        time.sleep(0.1)
        self.update_state(state="PROGRESS", meta={"done": step, "total": steps})
    return f"crunched {steps} steps"


# ``throws``: a ValueError is this task's expected outcome, so the worker records the
# FAILURE without logging it as an error with a traceback (it logs one INFO line).
@app.task(throws=(ValueError,))
def explode() -> None:
    raise ValueError("this task always fails")
