"""Await Celery results from asyncio, without polling and without a thread per wait.

::

    from celery_perkey_backend import aio

    value = await aio.wait(add.delay(2, 2), timeout=10)
    async for done in aio.as_completed([a, b, c], timeout=30):
        print(done.id, done.result)
    async for meta in aio.watch(progress_task.delay(), timeout=60):
        print(meta["status"], meta["result"])

Every wait of the process, from any event loop, is served by its one
:class:`~.multiplex.Multiplexer`: two background threads on two connections, woken by
the notifications the store script pushes, with the result list as the truth. A wait
costs no connection and no thread of its own, so tens of thousands can run at once; a
cancelled wait leaves nothing behind (it never owns a connection, so none can be left
out of sync). It works with the app's configured backend, by configuration alone; an
app whose backend is not ``perkey`` gets a :class:`ConfigurationError`.

The answers are those of ``result.get()``: the value, or the task's exception (with
``propagate``), Celery's ``TimeoutError`` when ``timeout`` passes, ``TaskRevokedError``
for a revoked task, and, as ``get()`` follows parents, a failed parent's own error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

from celery import states
from celery.result import AsyncResult, ResultSet

from .backend import PerkeyBackend
from .connection import READ_MARGIN
from .deadline import Deadline
from .errors import BackendUnavailableError, ConfigurationError
from .store import Record
from .waiting import MAX_BLOCK, PARENT_CHECK, Steps, timed_out
from .watches import Watch

__all__ = ["as_completed", "wait", "watch"]

Meta = dict[str, Any]


def _backend(result: AsyncResult | ResultSet) -> PerkeyBackend:
    backend = result.backend if isinstance(result, AsyncResult) else result.app.backend
    if not isinstance(backend, PerkeyBackend):
        raise ConfigurationError(
            f"celery_perkey_backend.aio needs the perkey result backend; the app "
            f"{result.app.main!r} uses {type(backend).__name__} ({backend.as_uri()})"
        )
    return backend


class _Waits:
    """Multiplexed waits of one coroutine, woken on its event loop."""

    def __init__(self, backend: PerkeyBackend) -> None:
        self.backend = backend
        self.mux = backend.waiter.mux
        self.loop = asyncio.get_running_loop()
        self.woken = asyncio.Event()
        self.watches: list[Watch] = []

    def _wake(self) -> None:
        # Called by the multiplexer's threads. A loop closed meanwhile (by hand, with
        # this coroutine never finished) runs nothing again: its waits are released.
        if not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.woken.set)
                return
            except RuntimeError:  # closed since the check
                pass
        self.close()

    def _alive(self) -> bool:
        return not self.loop.is_closed()

    def add(self, task_id: str, progress: bool = False) -> Watch:
        watch = self.mux.watch(
            task_id,
            self._wake,
            progress=progress,
            consume=self.backend.settings.read_once,
            alive=self._alive,
        )
        self.watches.append(watch)
        return watch

    def close(self) -> None:
        watches, self.watches = self.watches, []
        for watch in watches:
            self.mux.release(watch)

    async def sleep(self, seconds: float) -> None:
        """Sleep until something arrives or ``seconds`` pass.

        A timer sets the event rather than ``asyncio.wait_for``, which (before Python
        3.12) swallows a cancellation that arrives as the awaited event is set.
        """
        timer = self.loop.call_later(seconds, self.woken.set)
        try:
            await self.woken.wait()
        finally:
            timer.cancel()
        self.woken.clear()


async def _check_parents(backend: PerkeyBackend, result: AsyncResult, deadline: Deadline) -> None:
    """Raise a failed parent's own error, as ``get()`` does.

    The reads block, so they run on the multiplexer's registrar thread (never the
    loop's default executor), under the wait's deadline: they end by it, and so does
    the awaiting here.

    Raises
    ------
    celery.exceptions.TimeoutError
        When the deadline passes first.
    """
    parents = []
    node = result.parent
    while node is not None:
        parents.append(node)
        node = getattr(node, "parent", None)
    if not parents:
        return
    task_id = str(result.id)

    def check() -> None:
        for parent in reversed(parents):
            parent.maybe_throw()

    # Each try holds the registrar for one bounded job at most (Multiplexer.call); a
    # lost connection is tried again by the one retry policy, within the deadline.
    failures = 0
    limit = backend.store.policy.max_retries
    while True:
        job = backend.waiter.mux.call(check, deadline)
        left = deadline.remaining()
        try:
            await asyncio.wait_for(
                asyncio.wrap_future(job), None if left is None else left + READ_MARGIN
            )
            return
        except asyncio.TimeoutError:
            raise timed_out(task_id) from None
        except BackendUnavailableError as exc:
            failures += 1
            if deadline.expired:
                raise timed_out(task_id) from exc
            if limit is not None and failures > limit:
                raise
            await asyncio.sleep(deadline.block_for(min(1.0, 0.05 * 2**failures)))


async def wait(
    result: AsyncResult | ResultSet, timeout: float | None = None, propagate: bool = True
) -> Any:
    """What ``result.get(timeout=…, propagate=…)`` returns, awaited.

    Parameters
    ----------
    result:
        An ``AsyncResult``, or a ``GroupResult``/``ResultSet`` (then a list of values
        in its order, as ``join_native`` gives).
    timeout:
        Seconds, or ``None`` to wait as long as it takes.
    propagate:
        Raise the task's exception (or a failed parent's) instead of returning it.

    Raises
    ------
    celery.exceptions.TimeoutError
        When ``timeout`` passes first.
    Exception
        The task's own exception, ``TaskRevokedError``, or a failed parent's error,
        with ``propagate``.
    ConfigurationError
        If the app's result backend is not ``perkey``.
    """
    if isinstance(result, ResultSet):
        return await _wait_all(result, timeout, propagate)
    backend = _backend(result)
    deadline = Deadline(timeout)
    follow = propagate and result.parent is not None
    if follow:
        await _check_parents(backend, result, deadline)
    waits = _Waits(backend)
    try:
        watch = waits.add(str(result.id))
        steps = Steps(watch, deadline, PARENT_CHECK if follow else MAX_BLOCK)
        while True:
            items = watch.take()
            if not items:
                await waits.sleep(steps.pause())
                items = watch.take()
            meta, stepped = steps.absorb(items, backend.final)
            if stepped and follow:
                await _check_parents(backend, result, deadline)
            if meta is not None:
                return backend.settle(result, meta, propagate)
    finally:
        waits.close()


async def _wait_all(group: ResultSet, timeout: float | None, propagate: bool) -> list[Any]:
    async for done in as_completed(group.results, timeout):
        if propagate and done.state in states.PROPAGATE_STATES:
            done.maybe_throw(propagate=True)
    return [member.result for member in group.results]


async def as_completed(
    results: Iterable[AsyncResult], timeout: float | None = None
) -> AsyncIterator[AsyncResult]:
    """Yield each result as it becomes ready, with its state and value in hand.

    Raises
    ------
    celery.exceptions.TimeoutError
        When ``timeout`` passes before every result is ready.
    """
    pending = {str(member.id): member for member in results}
    if not pending:
        return
    backend = _backend(next(iter(pending.values())))
    deadline = Deadline(timeout)
    waits = _Waits(backend)
    try:
        watches = {task_id: waits.add(task_id) for task_id in pending}
        steps = {task_id: Steps(w, deadline, MAX_BLOCK) for task_id, w in watches.items()}
        while pending:
            arrived = False
            for task_id in list(pending):
                items = watches[task_id].take()
                arrived = arrived or bool(items)
                meta, _ = steps[task_id].absorb(items, backend.final)
                if meta is not None:
                    done = pending.pop(task_id)
                    backend.settle(done, meta, propagate=False)
                    yield done
            if pending and not arrived:
                await waits.sleep(min(steps[task_id].pause() for task_id in pending))
    finally:
        waits.close()


async def watch(result: AsyncResult, timeout: float | None = None) -> AsyncIterator[Meta]:
    """Yield the task's state when the watch begins (PENDING included), then each new
    state as it is stored (STARTED, PROGRESS, RETRY, ...), then the final one: the
    asyncio form of ``get(on_message=…)``.

    Raises
    ------
    celery.exceptions.TimeoutError
        When ``timeout`` passes before the task is ready.
    """
    backend = _backend(result)
    deadline = Deadline(timeout)
    waits = _Waits(backend)
    try:
        watched = waits.add(str(result.id), progress=True)
        steps = Steps(watched, deadline, MAX_BLOCK)
        while True:
            items = watched.take()
            if not items:
                await waits.sleep(steps.pause())
                continue
            shown: list[tuple[Meta, bool]] = []
            steps.absorb(items, lambda record: None, _collect(backend, shown))
            for meta, final in shown:
                yield meta
                if final:
                    backend.settle(result, meta, propagate=False)
                    return
    finally:
        waits.close()


def _collect(backend: PerkeyBackend, into: list[tuple[Meta, bool]]) -> Any:
    """An ``on_record`` that decodes each state into ``into``, with whether it is final."""

    def seen(record: Record | None, first: bool) -> None:
        if record is None:
            into.append(({"status": states.PENDING, "result": None}, False))
            return
        meta = backend.decode_record(record)
        final = record.kind == "ready" or (
            record.kind == "fallback" and meta["status"] in states.READY_STATES
        )
        into.append((meta, final))

    return seen
