"""Waiting: a wait is a first read, then a series of blocking steps, under one deadline.

Every step blocks on the data itself (the result list, or the progress stream for
``on_message``), so nothing stored while a waiter was away is ever missed: its next
step finds it. Each step is shorter than the socket timeout, so a long wait never trips
redis-py's read timeout (which Celery would log as a lost connection). A lost
connection is retried under the store's one retry policy, with one warning per wait.

The whole wait runs under its deadline (:func:`~.connection.bounded_by`): connecting,
every reply and queueing for a free connection end by it, whatever the server does.

After every step, including the one that found the result, the caller's ``on_step``
runs before the wait returns; a result found by the first read, before any step, is
returned at once. Celery's own drainer orders the two the same way, and it is what
makes a failed parent's error win over the error it caused in a child.

A server out of memory (``maxmemory`` with ``noeviction``) refuses the blocking list
commands; a wait then reads instead, backing off, and blocks again as soon as the
server takes the command.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import redis
from celery import states
from celery.exceptions import TimeoutError

from .connection import bounded_by
from .deadline import MIN_BLOCK, Deadline
from .errors import BackendUnavailableError, PoolExhaustedError, ServerFullError, quote_id
from .store import Record, ResultStore

__all__ = ["MAX_BLOCK", "PARENT_CHECK", "Waiter", "block_cap"]

logger = logging.getLogger("celery_perkey_backend")

T = TypeVar("T")
Meta = dict[str, Any]

#: The longest single blocking step. Long waits are made of several, so that a dead
#: connection is noticed and parent failures of a chain are re-checked between them.
MAX_BLOCK = 10.0

#: The longest step of a wait whose result has parents: Celery's drainer checks the
#: parents once a second, and so does a wait here.
PARENT_CHECK = 1.0

#: How often a wait re-reads what it cannot block on: a key written by ``redis://``
#: during a switch, or anything while the server is out of memory (it backs off from
#: the first to the second).
POLL_FIRST = 0.05
POLL_MAX = 0.5

_full_warned = threading.Event()


def block_cap(socket_timeout: float | None) -> float:
    """The longest block that stays safely below the socket timeout.

    The margin covers the server's clock tick (up to 100 ms at the default hz) and a
    busy client or server.
    """
    if socket_timeout is None:
        return MAX_BLOCK
    margin = max(0.25, socket_timeout * 0.2)
    return max(MIN_BLOCK, min(MAX_BLOCK, socket_timeout - margin))


def _timed_out(task_id: str, why: str = "") -> TimeoutError:
    return TimeoutError(f"The operation timed out waiting for task {quote_id(task_id)}.{why}")


def _warn_full(error: Exception) -> None:
    if not _full_warned.is_set():
        _full_warned.set()
        logger.warning(
            "perkey: the server is out of memory and refuses blocking waits (%s); "
            "waits read every %.2f s instead until it takes them again",
            error,
            POLL_MAX,
        )


class _Backoff:
    """Pauses that grow from :data:`POLL_FIRST` to :data:`POLL_MAX`, never past the deadline."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline
        self.pause = POLL_FIRST

    def reset(self) -> None:
        self.pause = POLL_FIRST

    def next(self) -> float:
        pause = self.pause
        self.pause = min(self.pause * 2, POLL_MAX)
        return self.deadline.block_for(pause)

    def sleep(self) -> None:
        time.sleep(self.next())


class Waiter:
    """Waits for results on the store, one connection per waiting thread.

    Parameters
    ----------
    store:
        Where the results are.
    """

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self.cap = block_cap(store.settings.socket_timeout_s)

    def _retried(
        self, op: Callable[[], T], task_id: str, deadline: Deadline, warned: list[bool]
    ) -> T:
        """``op`` under the retry policy and the deadline; Celery's TimeoutError once the
        deadline has passed, whatever the last failure was."""

        def on_retry(error: Exception, failures: int) -> None:
            if not warned:
                warned.append(True)
                logger.warning(
                    "perkey: connection lost while waiting for task %s; retrying",
                    quote_id(task_id),
                )

        try:
            return self.store.policy.call(op, "wait", deadline, on_retry)
        except PoolExhaustedError as exc:
            raise _timed_out(task_id, f" {exc}") from exc
        except BackendUnavailableError:
            if deadline.expired:
                raise _timed_out(task_id) from None
            raise

    def attempt(self, op: Callable[[], T], task_id: str, deadline: Deadline) -> T:
        """One read of a wait, outside its steps: bounded by the deadline, retried.

        Raises
        ------
        celery.exceptions.TimeoutError
            When the deadline passes first.
        """
        with bounded_by(deadline):
            return self._retried(op, task_id, deadline, [])

    def until_ready(
        self,
        task_id: str,
        deadline: Deadline,
        accept: Callable[[Record], T | None],
        first: Callable[[], T | None] | None = None,
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
        first:
            The first read, before any step (e.g. one that reads a whole join at
            once); what it finds is returned at once.
        consume:
            Read-once: the result is taken, so of several waiters exactly one gets it.
        on_step:
            Runs after every step, the finding one included, before the wait returns.
        cap:
            The longest single step, when shorter than the socket allows.

        Raises
        ------
        celery.exceptions.TimeoutError
            When the deadline passes first, whatever the server did meanwhile.
        BackendUnavailableError
            When the connection stays lost past the retry policy.
        """
        with bounded_by(deadline):
            warned: list[bool] = []
            if first is not None:
                found = self._retried(first, task_id, deadline, warned)
                if found is not None:
                    return found
            step = self._stepper(task_id, deadline, consume, cap)
            while not deadline.expired:
                record = self._retried(step, task_id, deadline, warned)
                found = accept(record) if record is not None else None
                if on_step is not None:
                    on_step()
                if found is not None:
                    return found
            raise _timed_out(task_id)

    def each_ready(
        self,
        task_ids: list[str],
        deadline: Deadline,
        read: Callable[[list[str]], dict[str, T]],
        accept: Callable[[Record], T | None],
        consume: bool = False,
        on_step: Callable[[], Any] | None = None,
        cap: float | None = None,
        max_reads: int | None = None,
    ) -> Iterator[tuple[str, T]]:
        """Yield ``(task_id, result)`` for each task as it is ready.

        ``read`` fetches whatever is ready among the missing ids in one round trip;
        then the wait blocks on one missing result at a time under the one deadline,
        and reads the rest again each time one arrives. With ``max_reads``, it stops
        after that many reads.

        Raises
        ------
        celery.exceptions.TimeoutError
            When the deadline passes first.
        """
        missing = list(task_ids)
        reads = 0
        while missing:
            reads += 1
            found = self.attempt(functools.partial(read, missing), missing[0], deadline)
            yield from found.items()
            missing = [tid for tid in missing if tid not in found]
            if not missing or (max_reads and reads >= max_reads):
                return
            if deadline.expired:
                raise _timed_out(missing[0])
            head = missing.pop(0)
            yield (
                head,
                self.until_ready(head, deadline, accept, consume=consume, on_step=on_step, cap=cap),
            )

    def _stepper(
        self, task_id: str, deadline: Deadline, consume: bool, cap: float | None
    ) -> Callable[[], Record | None]:
        """One blocking step of a wait for a ready result."""
        store = self.store
        step_cap = self.cap if cap is None else min(cap, self.cap)
        overran = [False]
        backoff = _Backoff(deadline)

        def step() -> Record | None:
            try:
                record = store.block_ready(task_id, deadline.block_for(step_cap))
            except ServerFullError as exc:
                # Out of memory: the blocking command is refused, reading is not.
                _warn_full(exc)
                record = store.read_ready([task_id]).get(task_id)
                if record is None:
                    backoff.sleep()
            except BackendUnavailableError as exc:
                # A busy server can answer a block's end a little past its timeout;
                # that alone is no lost connection. Twice in a row is.
                if isinstance(exc.__cause__, redis.TimeoutError) and not overran[0]:
                    overran[0] = True
                    return None
                raise
            else:
                backoff.reset()  # blocking works (again)
            overran[0] = False
            if consume and record is not None and record.kind == "ready":
                # Woken by the rotation; the take decides which reader gets it.
                return store.read_ready([task_id], consume=True).get(task_id)
            return record

        return step

    def follow(
        self,
        task_id: str,
        deadline: Deadline,
        decode: Callable[[Record], Meta],
        on_message: Callable[[Meta], Any],
        consume: bool = False,
        on_step: Callable[[], Any] | None = None,
        cap: float | None = None,
    ) -> Meta:
        """Wait, handing ``on_message`` the current state and then each new one.

        Like ``redis://``, the first message is the state when the wait began, PENDING
        included; then every intermediate state as it is stored; then the ready one.
        Intermediate states are read from the task's progress stream with a blocking
        XREAD; the ready write adds a marker entry there, which ends the wait. A task
        that Celery's ``redis://`` backend is running (a switch in progress) has its
        key read every :data:`POLL_MAX` seconds instead, and so has every task while
        the server is out of memory.

        Raises
        ------
        celery.exceptions.TimeoutError
            When the deadline passes first.
        """
        with bounded_by(deadline):
            return _Follower(self, task_id, deadline, decode, consume, cap).run(on_message, on_step)


class _Follower:
    """The state of one ``on_message`` wait: what it has seen and how it must poll."""

    def __init__(
        self,
        waiter: Waiter,
        task_id: str,
        deadline: Deadline,
        decode: Callable[[Record], Meta],
        consume: bool,
        cap: float | None,
    ) -> None:
        self.waiter = waiter
        self.store = waiter.store
        self.task_id = task_id
        self.deadline = deadline
        self.decode = decode
        self.consume = consume
        self.cap = waiter.cap if cap is None else min(cap, waiter.cap)
        self.ttl_ms = _ms(self.store.settings.result_expires_s)
        self.pkey = self.store.layout.progress(task_id)
        self.last = b"0-0"
        self.warned: list[bool] = []
        #: A key of Celery's redis:// backend holds this task: poll it.
        self.legacy = False
        #: The server refused the watch for lack of memory: poll everything.
        self.full = False
        #: The last block ended with news on the progress stream.
        self.news = False
        self.shown: bytes | None = None
        self.backoff = _Backoff(deadline)

    def run(self, on_message: Callable[[Meta], Any], on_step: Callable[[], Any] | None) -> Meta:
        ready, metas = self._read(first=True)
        # Like redis://, start with the current state, PENDING included.
        pending: Meta = {"status": states.PENDING, "result": None}
        for meta in [ready] if ready is not None else metas[-1:] or [pending]:
            on_message(meta)
        if ready is not None:
            return ready
        while True:
            if self.deadline.expired:
                raise _timed_out(self.task_id)
            self._block()
            ready, metas = self._read(first=False)
            for meta in metas:
                on_message(meta)
            if ready is not None:
                on_message(ready)
            if on_step is not None:
                on_step()
            if ready is not None:
                return ready

    def _retried(self, op: Callable[[], T]) -> T:
        return self.waiter._retried(op, self.task_id, self.deadline, self.warned)

    def _read(self, first: bool) -> tuple[Meta | None, list[Meta]]:
        """The ready meta if there is one, and the states not yet handed on."""
        store, task_id = self.store, self.task_id
        try:
            ready, entries = self._retried(lambda: store.watch(task_id, self.last, self.ttl_ms))
            self.full = False
        except ServerFullError as exc:
            _warn_full(exc)
            self.full, ready, entries = True, None, []
        if ready is not None and self.consume:
            ready = self._retried(lambda: store.read_ready([task_id], consume=True).get(task_id))
        if ready is not None:
            return self.decode(ready), []
        metas = []
        for entry_id, payload in entries:
            self.last = entry_id
            if payload:
                metas.append(self.decode(Record(task_id, self.pkey, payload, "progress")))
                self.shown = payload
        # A redis:// worker writes nowhere a block would notice: its key is read at
        # first, after each block that ended empty, and polled once it is seen.
        if first or self.legacy or self.full or not self.news:
            polled = self._retried(
                lambda: store.read_state(task_id) if self.full else store.read_fallback(task_id)
            )
            if polled is not None and polled.payload != self.shown:
                self.shown = polled.payload
                self.legacy = self.legacy or polled.kind == "fallback"
                meta = self.decode(polled)
                if polled.kind == "ready" or meta["status"] in states.READY_STATES:
                    return meta, metas
                metas.append(meta)
        return None, metas

    def _block(self) -> None:
        if self.full:
            self.backoff.sleep()
            return
        seconds = self.deadline.block_for(POLL_MAX if self.legacy else self.cap)
        store, last = self.store, self.last
        self.news = self._retried(lambda: store.block_progress(self.task_id, last, seconds))


def _ms(seconds: float | None) -> int:
    return int(seconds * 1000) if seconds else 0
