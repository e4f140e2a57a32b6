"""A FastAPI service that runs Celery tasks and awaits their results, without polling.

The Celery app is the one in ``tasks.py``: plain Celery, whose only perkey line is
``result_backend``. The web side awaits results with ``celery_perkey_backend.aio``,
so a waiting request holds neither a thread nor a connection of its own.

    POST /jobs                  {"task": "crunch", "args": [20]} -> 202 {"id": "..."}
    GET  /jobs/{id}?wait=5      the answer within 5 s: 200 when the task is done
                                (its result, or its error), else 202 and its state so
                                far (PENDING, STARTED, PROGRESS with its info)
    GET  /jobs/{id}/events      its states as server-sent events, one JSON object each,
                                from the state when the stream opens to the final one

Run it from this directory, against a Redis or Valkey on 127.0.0.1:6379 (or set
``EXAMPLE_REDIS=host:port``), with ``pip install -e '..[fastapi]'``::

    celery -A tasks worker --pool=threads --loglevel=INFO
    uvicorn fastapi_app:api
    curl -X POST localhost:8000/jobs -H 'content-type: application/json' \\
         -d '{"task": "crunch", "args": [20]}'
    curl 'localhost:8000/jobs/<id>?wait=5'
    curl -N localhost:8000/jobs/<id>/events

The event stream ends after the final state (SUCCESS, FAILURE or REVOKED): a browser's
``EventSource`` reconnects when a stream ends, so close it when that state arrives. A
client that leaves early ends its wait (the server cancels the stream).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from celery import states
from celery.exceptions import TimeoutError
from fastapi import FastAPI, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from tasks import add, app, crunch, explode

from celery_perkey_backend import aio

TASKS = {"add": add, "crunch": crunch, "explode": explode}

api = FastAPI(title="perkey jobs")


class JobRequest(BaseModel):
    task: Literal["add", "crunch", "explode"]
    args: list[Any] = Field(default_factory=list)


def describe(job_id: str, state: str, info: Any) -> dict[str, Any]:
    """A job's state as JSON: its result, its error, or what it said so far."""
    body: dict[str, Any] = {"id": job_id, "state": state}
    if isinstance(info, BaseException):  # FAILURE, REVOKED, RETRY
        body["error"] = {"type": type(info).__name__, "message": str(info)}
    elif state == states.SUCCESS:
        body["result"] = info
    else:
        body["info"] = info  # STARTED: the worker; PROGRESS: what update_state said
    return jsonable_encoder(body)


@api.post("/jobs", status_code=202)
def submit(job: JobRequest) -> dict[str, str]:
    # A plain def: FastAPI runs it in its thread pool, so publishing blocks no request.
    result = TASKS[job.task].delay(*job.args)
    return {"id": result.id}


@api.get("/jobs/{job_id}")
async def status(job_id: str, wait: float = Query(0.0, ge=0, le=60)) -> JSONResponse:
    result = app.AsyncResult(job_id)
    try:
        value = await aio.wait(result, timeout=wait, propagate=False)
    except TimeoutError:
        # Not done in time: answer with the state so far (one read, off the loop).
        meta = await asyncio.to_thread(result.backend.get_task_meta, job_id)
        code = 200 if meta["status"] in states.READY_STATES else 202
        return JSONResponse(describe(job_id, meta["status"], meta["result"]), code)
    return JSONResponse(describe(job_id, result.state, value))


@api.get("/jobs/{job_id}/events")
async def events(job_id: str) -> StreamingResponse:
    result = app.AsyncResult(job_id)

    async def stream() -> AsyncIterator[str]:
        async for meta in aio.watch(result):
            body = describe(job_id, meta["status"], meta["result"])
            yield f"data: {json.dumps(body)}\n\n"

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
