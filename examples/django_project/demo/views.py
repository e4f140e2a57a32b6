"""Two views: one dispatches a task, the other returns its state and result."""

import contextlib

from celery.exceptions import TimeoutError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET, require_POST

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
    body: dict[str, object] = {"task_id": task_id, "state": result.state}
    if result.successful():
        body["result"] = result.result
    elif result.failed():
        body["error"] = repr(result.result)
    return JsonResponse(body)
