"""The FastAPI example (examples/fastapi_app.py), served by uvicorn, driven over HTTP.

Its Celery app is examples/tasks.py, run by a real ``celery worker`` subprocess on the
test server; the HTTP server is uvicorn on a free loopback port, in a thread of the test
process, so an event stream arrives as it is sent (httpx's in-process ASGI transport
would hand over the whole body at its end). To hold a task back until a wait has begun,
a test stops the worker with SIGSTOP and lets it go on with SIGCONT.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import redis
import uvicorn

from celery_perkey_backend.testing import EmbeddedServer

from .conftest import stop_process, wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def example(server: EmbeddedServer) -> Iterator[ModuleType]:
    """The example's module, its Celery app pointed at the test server."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EXAMPLE_REDIS", f"127.0.0.1:{server.port}")
        patch.syspath_prepend(str(EXAMPLES))
        yield importlib.import_module("fastapi_app")


@pytest.fixture(scope="module")
def worker(server: EmbeddedServer, example: ModuleType) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A tasks worker`` in examples/, as its README runs it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool=threads",
         "--concurrency=4", "--loglevel=WARNING", "--without-gossip", "--without-mingle",
         "--without-heartbeat"],
        cwd=EXAMPLES, env=dict(os.environ, EXAMPLE_REDIS=f"127.0.0.1:{server.port}"),
        start_new_session=True,
    )  # fmt: skip
    yield proc
    stop_process(proc)


@pytest.fixture(scope="module")
def client(example: ModuleType, worker: subprocess.Popen[bytes]) -> Iterator[httpx.Client]:
    """An HTTP client of the example's API, served by uvicorn on a free port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    web = uvicorn.Server(uvicorn.Config(example.api, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: web.started, "uvicorn serves the example")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            yield http
    finally:
        web.should_exit = True
        thread.join(30)
        sock.close()


@contextmanager
def stopped(worker: subprocess.Popen[bytes]) -> Iterator[None]:
    """The worker, stopped (it takes and runs nothing) until the block ends, or until
    the test resumes it itself."""
    os.killpg(worker.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(worker.pid, signal.SIGCONT)


def submit(client: httpx.Client, task: str, *args: Any) -> str:
    answer = client.post("/jobs", json={"task": task, "args": list(args)})
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["id"]
    return job_id


def server_sent_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The JSON payload of each event of a ``text/event-stream``, as it arrives."""
    data: list[str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data.append(line.removeprefix("data: "))
        elif not line and data:
            yield json.loads("\n".join(data))
            data = []
    assert not data, "the stream ended inside an event"


def test_dispatch_and_await(client: httpx.Client) -> None:
    job = submit(client, "add", 2, 3)
    answer = client.get(f"/jobs/{job}", params={"wait": 30})
    assert answer.status_code == 200
    assert answer.json() == {"id": job, "state": "SUCCESS", "result": 5}
    # Once stored, the result is the answer at once, with no wait at all.
    again = client.get(f"/jobs/{job}")
    assert (again.status_code, again.json()) == (200, answer.json())


def test_bad_requests_are_refused_with_the_reason(client: httpx.Client) -> None:
    unknown = client.post("/jobs", json={"task": "shutdown", "args": []})
    assert unknown.status_code == 422
    assert unknown.json()["detail"][0]["loc"] == ["body", "task"]
    negative = client.get(f"/jobs/{uuid.uuid4()}", params={"wait": -1})
    assert negative.status_code == 422
    assert negative.json()["detail"][0]["loc"] == ["query", "wait"]


def test_a_wait_that_runs_out_answers_with_the_state_so_far(
    client: httpx.Client, worker: subprocess.Popen[bytes]
) -> None:
    with stopped(worker):
        job = submit(client, "crunch", 5)
        # The worker cannot take the task: the wait runs out, and says it is pending.
        early = client.get(f"/jobs/{job}", params={"wait": 0.2})
        assert early.status_code == 202
        assert early.json() == {"id": job, "state": "PENDING", "info": None}
    answers = []
    deadline = time.monotonic() + 60
    while not answers or answers[-1].status_code == 202:
        assert time.monotonic() < deadline, f"the job never finished: {answers[-1].json()}"
        answers.append(client.get(f"/jobs/{job}", params={"wait": 0.05}))
    *pending, done = answers
    assert (done.status_code, done.json()) == (
        200,
        {"id": job, "state": "SUCCESS", "result": "crunched 5 steps"},
    )
    for answer in pending:
        body = answer.json()
        assert body["state"] in {"PENDING", "STARTED", "PROGRESS"}, body
        if body["state"] == "PROGRESS":
            assert body["info"]["total"] == 5 and 1 <= body["info"]["done"] <= 5, body


def test_a_failed_task_gives_its_error(client: httpx.Client) -> None:
    job = submit(client, "explode")
    answer = client.get(f"/jobs/{job}", params={"wait": 30})
    failed = {
        "id": job,
        "state": "FAILURE",
        "error": {"type": "ValueError", "message": "this task always fails"},
    }
    assert (answer.status_code, answer.json()) == (200, failed)
    # The event stream of a finished job: its final state, then the end.
    with client.stream("GET", f"/jobs/{job}/events") as response:
        assert list(server_sent_events(response)) == [failed]


def test_the_event_stream_sends_each_state_in_order_then_ends(
    client: httpx.Client, worker: subprocess.Popen[bytes]
) -> None:
    with stopped(worker):
        job = submit(client, "crunch", 4)
        with client.stream("GET", f"/jobs/{job}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = server_sent_events(response)
            # The task cannot start while the worker is stopped, so this event was sent
            # on its own, not with the rest at the end.
            assert next(events) == {"id": job, "state": "PENDING", "info": None}
            os.killpg(worker.pid, signal.SIGCONT)
            rest = list(events)
    assert [event["state"] for event in rest] == ["STARTED", *["PROGRESS"] * 4, "SUCCESS"]
    assert set(rest[0]["info"]) == {"pid", "hostname"}
    assert [event["info"] for event in rest[1:-1]] == [{"done": i, "total": 4} for i in range(1, 5)]
    assert rest[-1] == {"id": job, "state": "SUCCESS", "result": "crunched 4 steps"}


def test_a_client_that_leaves_the_stream_ends_its_wait(
    client: httpx.Client, example: ModuleType, server: EmbeddedServer
) -> None:
    job = str(uuid.uuid4())  # never dispatched: PENDING for ever
    # The process's inbox is in the task's watchers set while a wait on it is on.
    watchers = example.app.backend.layout.watchers(job)
    with redis.Redis(port=server.port, db=0) as r:
        with client.stream("GET", f"/jobs/{job}/events") as response:
            # Held: an event iterator dropped early closes the connection.
            events = server_sent_events(response)
            assert next(events)["state"] == "PENDING"
            assert r.exists(watchers)
        wait_until(lambda: not r.exists(watchers), "the stream's wait is given up")
