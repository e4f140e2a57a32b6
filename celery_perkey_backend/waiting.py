"""Waiting: a wait is a series of blocking steps on the store, under one deadline.

Every step blocks on the data itself (the result list, or the progress stream for
``on_message``), so nothing stored while a waiter was away is ever missed: its next
step finds it. Each step is shorter than the socket timeout, so a long wait never trips
redis-py's read timeout (which Celery would log as a lost connection). A lost
connection is retried under the store's one retry policy, with one warning per wait.

After every step, including the one that found the result, the caller's ``on_step``
runs before the wait returns: that is where Celery checks a failed parent, and its own
drainer orders the two the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from celery import states
from celery.exceptions import TimeoutError

from .deadline import MIN_BLOCK, Deadline
from .errors import BackendUnavailableError
from .store import Record, ResultStore

__all__ = ["MAX_BLOCK", "Waiter", "block_cap"]

logger = logging.getLogger("celery_perkey_backend")

T = TypeVar("T")
Meta = dict[str, Any]

#: The longest single blocking step. Long waits are made of several, so that a dead
#: connection is noticed and parent failures of a chain are re-checked between them.
MAX_BLOCK = 10.0


def block_cap(socket_timeout: float | None) -> float:
    """The longest block that stays safely below the socket timeout.

    The margin covers the server's clock tick (up to 100 ms at the default hz) and a
    busy client or server.
    """
    if socket_timeout is None:
        return MAX_BLOCK
    margin = max(0.25, socket_timeout * 0.2)
    return max(MIN_BLOCK, min(MAX_BLOCK, socket_timeout - margin))


def _timed_out(task_id: str) -> TimeoutError:
    return TimeoutError(f"The operation timed out waiting for task {task_id!r}.")


class Waiter:
    """Blocks on the store, one connection per wait, until a result is ready.

    Parameters
    ----------
    store:
        Where the results are.
    """

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self.cap = block_cap(store.settings.socket_timeout_s)

    def until_ready(
        self,
        task_id: str,
        deadline: Deadline,
        accept: Callable[[Record], T | None],
        consume: bool = False,
        on_step: Callable[[], Any] | None = None,
        cap: float | None = None,
    ) -> T:
        """Block until ``accept`` takes a record of the task, and return what it made.

        Parameters
        ----------
        accept:
            Decodes a record; returns ``None`` for one that is not a final state (a
            fallback key holding an intermediate state).
        consume:
            Read-once: the result is taken, so of several waiters exactly one gets it.
        on_step:
            Runs after every step, the finding one included, before the wait returns.
        cap:
            The longest single step, when shorter than the socket allows.

        Raises
        ------
        celery.exceptions.TimeoutError
            When the deadline passes first.
        BackendUnavailableError
            When the connection stays lost past the retry policy.
        """
        step_cap = self.cap if cap is None else min(cap, self.cap)
        warned: list[bool] = []
        overran = [False]

        def on_retry(error: Exception, failures: int) -> None:
            if not warned:
                warned.append(True)
                logger.warning(
                    "perkey: connection lost while waiting for task %r; retrying", task_id
                )

        def step() -> Record | None:
            try:
                record = self.store.block_ready(task_id, deadline.block_for(step_cap))
            except BackendUnavailableError as exc:
                # A busy server can answer a block's end a little past its timeout;
                # that alone is no lost connection. Twice in a row is.
                if isinstance(exc.__cause__, redis.TimeoutError) and not overran[0]:
                    overran[0] = True
                    return None
                raise
            overran[0] = False
            if consume and record is not None and record.kind == "ready":
                # Woken by the rotation; the take decides which reader gets it.
                return self.store.read_ready([task_id], consume=True).get(task_id)
            return record

        while not deadline.expired:
            try:
                record = self.store.policy.call(step, "wait", deadline, on_retry)
            except BackendUnavailableError:
                if deadline.expired:
                    raise _timed_out(task_id) from None
                raise
            found = accept(record) if record is not None else None
            if found is not None:
                return found
            if on_step is not None:
                on_step()
        raise _timed_out(task_id)

    def follow(
        self,
        task_id: str,
        deadline: Deadline,
        decode: Callable[[Record], Meta],
        on_message: Callable[[Meta], Any],
        consume: bool = False,
        on_step: Callable[[], Any] | None = None,
    ) -> Meta:
        """Wait, handing ``on_message`` the current state and then each new one.

        Like ``redis://``, the first message is the state when the wait began, PENDING
        included; then every intermediate state as it is stored; then the ready one.
        Intermediate states are read from the task's progress stream with a blocking
        XREAD; the ready write adds a marker entry there, which ends the wait.

        Raises
        ------
        celery.exceptions.TimeoutError
            When the deadline passes first.
        """
        store = self.store
        ttl_ms = _ms(store.settings.result_expires_s)
        pkey = store.layout.progress(task_id)
        last = b"0-0"
        first = True
        news = False
        handed: bytes | None = None  # the fallback value last handed to on_message
        while True:
            ready, entries = store.watch(task_id, last, ttl_ms)
            if ready is not None and consume:
                ready = store.read_ready([task_id], consume=True).get(task_id)
            if ready is not None:
                meta = decode(ready)
                on_message(meta)
                return meta
            metas = []
            for entry_id, payload in entries:
                last = entry_id
                if payload:
                    metas.append(decode(Record(task_id, pkey, payload, "progress")))
            # At first, and after a block that ended empty: a redis:// worker writes
            # nowhere a block would notice (during a switch).
            fallback = None if news else store.read_fallback(task_id)
            if fallback is not None and fallback.payload != handed:
                handed = fallback.payload
                meta = decode(fallback)
                if meta["status"] in states.READY_STATES:
                    on_message(meta)
                    return meta
                metas.append(meta)
            if first:
                first = False
                metas = metas[-1:] or [{"status": states.PENDING, "result": None}]
            for meta in metas:
                on_message(meta)
            if deadline.expired:
                raise _timed_out(task_id)
            news = store.block_progress(task_id, last, deadline.block_for(self.cap))
            if not news and on_step is not None:
                on_step()
            # Whatever arrived is read again by the next step, from ``last`` on.


def _ms(seconds: float | None) -> int:
    return int(seconds * 1000) if seconds else 0
