"""The Django example (``examples/django_project``), driven by Django's test client.

The project is configured the standard way (``config_from_object('django.conf:settings',
namespace='CELERY')``). Its views run in this process; its tasks run in a real
``celery -A proj worker`` subprocess; both use the session's server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.app import setup_default_app

from celery_perkey_backend.testing import EmbeddedServer

PROJECT = Path(__file__).resolve().parent.parent / "examples" / "django_project"

#: The project's settings, as ``proj/settings.py`` sets them.
RESULT_EXPIRES = 3600
SWEEP_TTL = 6 * 3600


class Project:
    """The project's Celery app, a test client, and its worker's log."""

    def __init__(self, app: Celery, log: Path) -> None:
        from django.test import Client

        self.app = app
        self.client = Client()
        self.log = log

    def worker_log(self) -> str:
        return "worker log:\n" + self.log.read_text(errors="replace")

    def state(self, task_id: str, **query: Any) -> dict[str, Any]:
        response = self.client.get(f"/tasks/{task_id}/", query)
        assert response.status_code == 200
        body: dict[str, Any] = response.json()
        return body

    def add(self, x: int, y: int) -> str:
        response = self.client.post("/add/", {"x": x, "y": y})
        assert response.status_code == 202
        task_id: str = response.json()["task_id"]
        return task_id


@pytest.fixture
def project(
    server: EmbeddedServer, r: redis.Redis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Project]:
    monkeypatch.setenv("PERKEY_EXAMPLE_REDIS", f"127.0.0.1:{server.port}")
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "proj.settings")
    monkeypatch.syspath_prepend(str(PROJECT))
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "proj", "worker", "--pool=threads",
             "--concurrency=2", "--loglevel=INFO", "--without-gossip", "--without-mingle",
             "--without-heartbeat"],
            cwd=PROJECT, env=dict(os.environ), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # The project's app becomes the current app while it is imported and used; the
        # suite's apps are restored afterwards, and its shared tasks forgotten.
        with setup_default_app(Celery("outside-the-project", set_as_current=False)):
            import django

            django.setup()
            from proj.celery import app

            app.set_current()  # as importing the project first made it
            yield Project(app, log)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)


def test_one_view_dispatches_and_another_reports(project: Project, r: redis.Redis) -> None:
    task_id = project.add(2, 3)
    state = project.state(task_id, wait=30)
    assert state == {"task_id": task_id, "state": "SUCCESS", "result": 5}, project.worker_log()
    # Stored in the task's own list, with the TTL of CELERY_RESULT_EXPIRES.
    key = project.app.backend.layout.result(task_id)
    assert r.type(key) == b"list"
    assert 0 < r.ttl(key) <= RESULT_EXPIRES
    # Reading does not consume it: the next request sees it too, without waiting.
    assert project.state(task_id)["result"] == 5
    # A task nobody sent is PENDING, also after waiting for it in vain.
    assert project.state("never-sent") == {"task_id": "never-sent", "state": "PENDING"}
    assert project.state("never-sent", wait=0.2)["state"] == "PENDING"


def test_an_async_view_awaits_on_the_event_loop(project: Project, r: redis.Redis) -> None:
    from django.test import AsyncClient

    async def ask(task_id: str, **query: Any) -> dict[str, Any]:
        response = await AsyncClient().get(f"/async/tasks/{task_id}/", query)
        assert response.status_code == 200
        body: dict[str, Any] = response.json()
        return body

    task_id = project.add(4, 5)
    state = asyncio.run(ask(task_id, wait=30))
    assert state == {"task_id": task_id, "state": "SUCCESS", "result": 9}, project.worker_log()
    assert asyncio.run(ask("never-sent", wait=0.2))["state"] == "PENDING"
    # The waits went through the process's multiplexer, and are over.
    assert project.app.backend.waiter.mux.waits == 0


def test_namespaced_settings_reach_the_views_and_the_worker(
    project: Project, r: redis.Redis
) -> None:
    from django.conf import settings

    # This process: CELERY_RESULT_EXPIRES and CELERY_PERKEY_SWEEP_TTL.
    assert project.app.backend.settings.result_expires_s == RESULT_EXPIRES
    assert project.app.backend.settings.sweep_ttl_s == SWEEP_TTL
    # The worker: its sweep gives a key without a TTL the TTL that
    # CELERY_PERKEY_SWEEP_TTL sets (longer than any result's, so it is the sweep's).
    task_id = project.add(20, 22)
    assert project.state(task_id, wait=30)["result"] == 42, project.worker_log()
    orphan = project.app.backend.layout.result(task_id)
    assert r.persist(orphan)
    entry = settings.CELERY_BEAT_SCHEDULE["perkey-sweep"]
    summary = project.app.send_task(entry["task"], kwargs=entry["kwargs"]).get(timeout=30)
    assert summary["ttl_set"] == 1
    assert RESULT_EXPIRES < r.ttl(orphan) <= SWEEP_TTL


def test_beat_schedules_the_sweep(project: Project, tmp_path: Path) -> None:
    from celery.beat import PersistentScheduler

    # The scheduler ``celery -A proj beat`` runs, on a schedule file of its own.
    beat = PersistentScheduler(project.app, schedule_filename=str(tmp_path / "schedule"))
    try:
        entry = beat.schedule["perkey-sweep"]
        assert entry.task == "celery_perkey_backend.sweep"
        assert entry.kwargs == {"max_age": "1d", "delete": False}
        # And Celery's own daily cleanup, which is the same sweep, as with any app
        # that sets result_expires.
        assert beat.schedule["celery.backend_cleanup"].task == "celery.backend_cleanup"
    finally:
        beat.close()
    assert "celery_perkey_backend.sweep" in project.app.tasks
