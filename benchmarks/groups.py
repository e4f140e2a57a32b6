"""Figure 4: ``GroupResult.get()`` of results already stored, and of results arriving."""

from __future__ import annotations

import gc
import time
from typing import Any

from celery import Celery
from celery.result import GroupResult

from .common import VALUE, BackendSpec, new_id, now_ns, store_one
from .context import Bench

#: How long before the helper starts storing when it cannot see the join wait.
SETTLE = 0.05


def _group(app: Celery, ids: list[str]) -> GroupResult:
    return app.GroupResult(new_id(), [app.AsyncResult(task_id) for task_id in ids])


def _timeout(n: int) -> float:
    return max(60.0, n / 20)


def _check(spec: BackendSpec, values: Any, n: int) -> None:
    if len(values) != n or any(value != VALUE for value in values):
        raise AssertionError(f"{spec.name}: the join returned wrong values")


def join_stored(bench: Bench, spec: BackendSpec, n: int) -> float:
    app = bench.app(spec.name)
    reply_to = bench.reply_to(spec)
    ids = [new_id() for _ in range(n)]
    for task_id in ids:
        store_one(app, spec, task_id, reply_to)
    time.sleep(0.02)
    group = _group(app, ids)
    gc.collect()
    start = time.perf_counter_ns()
    values = group.get(timeout=_timeout(n))
    elapsed = time.perf_counter_ns() - start
    _check(spec, values, n)
    return float(elapsed)


def join_arriving(bench: Bench, spec: BackendSpec, n: int) -> tuple[float, float, bool]:
    """Join while the helper stores: ns from the first store issued to the join's return,
    and from the last store issued to the join's return."""
    app = bench.app(spec.name)
    ids = [new_id() for _ in range(n)]
    group = _group(app, ids)
    args: dict[str, Any] = {
        "backend": spec.name,
        "task_ids": ids,
        "probe": spec.probe,
        "reply_to": bench.reply_to(spec),
        "need": bench.blocked_clients() + 1,
        "delay": 0.0 if spec.probe != "sleep" else SETTLE,
    }
    if spec.probe == "subscribed":
        key = app.backend.get_key_for_task(ids[-1])
        args["channel"] = key.decode() if isinstance(key, bytes) else str(key)
        args["need"] = 1
    gc.collect()
    bench.helper.send("arrive", **args)
    failure: BaseException | None = None
    values: Any = []
    try:
        values = group.get(timeout=_timeout(n))
    except BaseException as exc:
        failure = exc
    returned = now_ns()
    first, last, seen = bench.helper.receive(_timeout(n))
    if failure is not None:
        raise failure
    _check(spec, values, n)
    return float(returned - first), float(returned - last), bool(seen)


def run_join(bench: Bench) -> None:
    n = bench.sizes.group
    for _ in bench.round_range("join"):
        for spec in bench.celery_specs:
            bench.results.add("join_stored", spec.name, join_stored(bench, spec, n))
        for spec in bench.celery_specs:
            total, tail, seen = join_arriving(bench, spec, n)
            bench.results.add("join_arriving", spec.name, total)
            bench.results.add("join_arriving_tail", spec.name, tail)
            if not seen:
                bench.results.note(
                    f"join: {spec.name} was stored to before the helper saw the join wait."
                )
