"""Views: one dispatches a task; the others return its state and result, waiting for it
in a thread (a sync view) or on the event loop (an async view)."""

import contextlib

from asgiref.sync import sync_to_async
from celery.exceptions import TimeoutError
from celery.result import AsyncResult
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET, require_POST

from celery_perkey_backend import aio

from .tasks import add


@require_POST
def dispatch_add(request: HttpRequest) -> JsonResponse:
    """POST x and y: send ``add`` to the workers; 202 with the task's id."""
    result = add.delay(int(request.POST["x"]), int(request.POST["y"]))
    return JsonResponse({"task_id": result.id}, status=202)


@require_GET
def task_state(request: HttpRequest, task_id: str) -> JsonResponse:
    """The task's state, and its result once it has one.

    ``?wait=S`` first waits up to S seconds for the result: a blocking wait on the
    task's own key (BLMOVE), woken the moment the worker stores it, with no polling.
    """
    result = add.AsyncResult(task_id)
    wait = request.GET.get("wait")
    if wait:
        # Not ready in time: report the state it has.
        with contextlib.suppress(TimeoutError):
            result.get(timeout=float(wait), propagate=False)
    return JsonResponse(_describe(result))


@require_GET
async def task_state_async(request: HttpRequest, task_id: str) -> JsonResponse:
    """The same, awaited: ``?wait=S`` waits on the event loop, not in a thread.

    ``aio.wait`` registers the wait with the process's multiplexer and sleeps until the
    store's notification (no polling, no connection of its own); many such requests
    wait at once on two connections.
    """
    result = add.AsyncResult(task_id)
    wait = request.GET.get("wait")
    if wait:
        with contextlib.suppress(TimeoutError):
            await aio.wait(result, timeout=float(wait), propagate=False)
    # Reading the state is a blocking call: off the event loop.
    return JsonResponse(await sync_to_async(_describe, thread_sensitive=False)(result))


def _describe(result: AsyncResult) -> dict[str, object]:
    body: dict[str, object] = {"task_id": result.id, "state": result.state}
    if result.successful():
        body["result"] = result.result
    elif result.failed():
        body["error"] = repr(result.result)
    return body
