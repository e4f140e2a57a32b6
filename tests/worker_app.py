"""A plain Celery app for `celery worker` subprocesses: perkey by configuration only."""

from __future__ import annotations

import os

from celery import Celery

PORT = os.environ["PERKEY_TEST_PORT"]

app = Celery("worker_app")
app.conf.update(
    broker_url=os.environ.get("PERKEY_TEST_BROKER", f"redis://127.0.0.1:{PORT}/1"),
    result_backend=os.environ.get("PERKEY_TEST_BACKEND", f"perkey://127.0.0.1:{PORT}/0"),
    task_track_started=True,
    broker_connection_retry_on_startup=True,
    beat_schedule={"often": {"task": "w.mul", "schedule": 0.2, "args": (2, 2)}},
    result_expires=3600,
)


if os.environ.get("PERKEY_TEST_ACKS_LATE"):
    # Redelivery of a task whose worker died: acknowledged only when done, and back in
    # the queue soon after the worker is gone.
    app.conf.task_acks_late = True
    app.conf.task_reject_on_worker_lost = True
    app.conf.broker_transport_options = {"visibility_timeout": 2}
if os.environ.get("PERKEY_TEST_READ_ONCE"):
    app.conf.perkey_read_once = True
if "PERKEY_TEST_RESULT_EXPIRES" in os.environ:
    app.conf.result_expires = float(os.environ["PERKEY_TEST_RESULT_EXPIRES"]) or None
if os.environ.get("PERKEY_TEST_LEGACY_FALLBACK"):
    app.conf.perkey_legacy_fallback = os.environ["PERKEY_TEST_LEGACY_FALLBACK"]
if os.environ.get("PERKEY_TEST_PROMETHEUS_PORT"):
    app.conf.perkey_prometheus_port = int(os.environ["PERKEY_TEST_PROMETHEUS_PORT"])
if os.environ.get("PERKEY_TEST_PROMETHEUS_TEXTFILE"):
    app.conf.perkey_prometheus_textfile = os.environ["PERKEY_TEST_PROMETHEUS_TEXTFILE"]
    app.conf.perkey_prometheus_refresh = 0.3

if os.environ.get("PERKEY_TEST_SWEEP_EVERY"):
    # The README's one beat entry for the sweep task.
    app.conf.beat_schedule = {
        "perkey-sweep": {
            "task": "celery_perkey_backend.sweep",
            "schedule": float(os.environ["PERKEY_TEST_SWEEP_EVERY"]),
            "kwargs": {"max_age": "1d"},
        }
    }


@app.task(name="w.mul")
def mul(x: int, y: int) -> int:
    return x * y


@app.task(name="w.steps", bind=True)
def steps(self, n: int) -> int:  # type: ignore[no-untyped-def]
    import time

    for i in range(n):
        self.update_state(state="PROGRESS", meta={"i": i})
        time.sleep(0.05)
    return n


@app.task(name="w.slow")
def slow(seconds: float, value: object) -> object:
    import time

    time.sleep(seconds)
    return value


@app.task(name="w.total")
def total(values: list[int]) -> int:
    return sum(values)


@app.task(name="w.fail")
def fail() -> None:
    raise ValueError("subprocess failure")
