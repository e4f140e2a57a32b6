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

A wait blocks either on its own connection (``BLMOVE`` on the result list), or through
the process's :class:`~.multiplex.Multiplexer`, which serves any number of waits on two
connections; ``on_message`` waits always go through it, since intermediate states are
notified, not blocked on.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import redis
from celery import states
from celery.exceptions import TimeoutError

from .connection import READ_MARGIN, bounded_by
from .deadline import MIN_BLOCK, Deadline
from .errors import BackendUnavailableError, PoolExhaustedError, ServerFullError, quote_id
from .multiplex import (
    POLL_INTERVAL,
    Multiplexer,
    multiplexer_for,
    stop_multiplexer,
    warn_server_full,
)
from .store import Record, ResultStore
from .watches import Initial, Watch

__all__ = [
    "MAX_BLOCK",
    "PARENT_CHECK",
    "Steps",
    "Waiter",
    "block_cap",
    "timed_out",
    "within_deadline",
]

logger = logging.getLogger("celery_perkey_backend")

T = TypeVar("T")
Meta = dict[str, Any]

#: The longest single blocking step. Long waits are made of several, so that a dead
#: connection is noticed and parent failures of a chain are re-checked between them.
MAX_BLOCK = 10.0

#: The longest step of a wait whose result has parents: Celery's drainer checks the
#: parents once a second, and so does a wait here.
PARENT_CHECK = 1.0

#: The first pause of a wait that reads because the server is out of memory; it grows
#: to :data:`~.multiplex.POLL_INTERVAL`.
POLL_FIRST = 0.05


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


class _Backoff:
    """Pauses that grow from :data:`POLL_FIRST` to ``POLL_INTERVAL``, never past the deadline."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline
        self.pause = POLL_FIRST

    def reset(self) -> None:
        self.pause = POLL_FIRST

    def next(self) -> float:
        pause = self.pause
        self.pause = min(self.pause * 2, POLL_INTERVAL)
        return self.deadline.block_for(pause)

    def sleep(self) -> None:
        time.sleep(self.next())


class Waiter:
    """Waits for results on the store.

    Parameters
    ----------
    store:
        Where the results are.
    multiplex:
        Wait through the process's multiplexer rather than one connection per wait.
    """

    def __init__(self, store: ResultStore, multiplex: bool = False) -> None:
        self.store = store
        self.multiplex = multiplex
        self.cap = block_cap(store.settings.socket_timeout_s)

    @property
    def mux(self) -> Multiplexer:
        """The process's multiplexer for this store (started on first use)."""
        return multiplexer_for(self.store)

    def close(self) -> None:
        """Stop the process's multiplexer for this store, if one runs: its waits fail
        with :class:`BackendUnavailableError`; a later wait starts a new one."""
        stop_multiplexer(self.store, BackendUnavailableError("the result backend was closed"))

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

        Multiplexed, each try runs on the multiplexer's connection, so that any number
        of concurrent waits read through a handful of connections; retries are the
        wait's, never the multiplexer's. Either way the read gets :data:`READ_MARGIN`
        past the deadline, so a ``timeout=0`` wait still sees what is stored.

        Raises
        ------
        celery.exceptions.TimeoutError
            When the deadline passes first.
        """
        with bounded_by(deadline):
            if not self.multiplex:
                return self._retried(op, task_id, deadline, [])
            return self._retried(lambda: self._on_mux(op, task_id, deadline), task_id, deadline, [])

    def _on_mux(self, op: Callable[[], T], task_id: str, deadline: Deadline) -> T:
        """One try of ``op`` on the multiplexer's connection, under ``deadline``."""
        future = self.mux.call(op, deadline)
        left = deadline.remaining()
        try:
            return future.result(timeout=None if left is None else left + READ_MARGIN)
        except FutureTimeout:
            future.cancel()
            raise _timed_out(task_id) from None

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
            if self.multiplex:
                return self._through(
                    task_id, deadline, accept, consume=consume, on_step=on_step, cap=cap
                )
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
        # Read-once: one token for every take of this wait, and a take under way until
        # its reply is here. A step retried after a take's lost reply takes again with
        # the token (and gets back what the lost one took) instead of blocking on a list
        # that the lost take emptied.
        token, taking = uuid.uuid4().hex, [False]

        def take() -> Record | None:
            taking[0] = True
            record = store.read_ready([task_id], consume=True, token=token).get(task_id)
            taking[0] = False
            return record

        def step() -> Record | None:
            if taking[0]:
                return take()
            try:
                record = store.block_ready(task_id, deadline.block_for(step_cap))
            except ServerFullError as exc:
                # Out of memory: the blocking command is refused, reading is not.
                warn_server_full(exc)
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
                return take()
            return record

        return step

    def _through(
        self,
        task_id: str,
        deadline: Deadline,
        accept: Callable[[Record], T | None],
        consume: bool = False,
        progress: bool = False,
        on_step: Callable[[], Any] | None = None,
        on_record: Callable[[Record | None, bool], None] | None = None,
        cap: float | None = None,
    ) -> T:
        """Wait through the multiplexer until ``accept`` takes a record.

        ``on_record`` sees every record handed on (``None``: nothing was stored when the
        wait began), and whether it is the first. Waiting for the registration is no
        step; every wait after it, woken or lapsed, is one.
        """
        woken = threading.Event()
        watch = self.mux.watch(task_id, woken.set, progress=progress, consume=consume)
        try:
            return _serve(
                watch,
                woken,
                deadline,
                accept,
                on_step,
                on_record,
                PARENT_CHECK if cap else MAX_BLOCK,
            )
        finally:
            self.mux.release(watch)

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
        States are notified through the process's multiplexer; a task that Celery's
        ``redis://`` backend runs (a switch in progress) has its key read every
        :data:`~.multiplex.POLL_INTERVAL` seconds, and so has every task while the server
        is out of memory.

        Raises
        ------
        celery.exceptions.TimeoutError
            When the deadline passes first.
        """
        metas: dict[int, Meta] = {}

        def seen(record: Record | None, first: bool) -> None:
            meta = {"status": states.PENDING, "result": None} if record is None else decode(record)
            metas[id(record)] = meta
            on_message(meta)

        def accept(record: Record) -> Meta | None:
            meta = metas.pop(id(record))
            final = record.kind == "ready" or meta["status"] in states.READY_STATES
            return meta if record.kind != "progress" and final else None

        return self._through(
            task_id,
            deadline,
            accept,
            consume=consume,
            progress=True,
            on_step=on_step,
            on_record=seen,
            cap=cap,
        )


def _serve(
    watch: Watch,
    woken: threading.Event,
    deadline: Deadline,
    accept: Callable[[Record], T | None],
    on_step: Callable[[], Any] | None,
    on_record: Callable[[Record | None, bool], None] | None,
    step_cap: float,
) -> T:
    """The waiting side of one multiplexed wait (see :meth:`Waiter._through`)."""
    steps = Steps(watch, deadline, step_cap)
    while True:
        items = watch.take()
        if not items:
            woken.wait(steps.pause())
            woken.clear()
            items = watch.take()
        found, stepped = steps.absorb(items, accept, on_record)
        if stepped and on_step is not None:
            on_step()
        if found is not None:
            return found


class Steps:
    """The bookkeeping of one multiplexed wait, for the sync and the asyncio waiter.

    A wait starts with its task's state at registration: found there, a result ends the
    wait with no step. Every wait after that, woken or lapsed, is a step, and so is a
    state that came after the registration's reply in the same batch; after a step the
    caller runs ``on_step``. The registration's reply gets :data:`READ_MARGIN` past the
    deadline, as any reply does, so a ``timeout=0`` wait still sees a stored result.
    """

    def __init__(self, watch: Watch, deadline: Deadline, step_cap: float) -> None:
        self.watch = watch
        self.deadline = deadline
        self.step_cap = step_cap
        self.started = self.waited = False
        left = deadline.remaining()
        self.grace_end = None if left is None else time.monotonic() + left + READ_MARGIN

    def pause(self) -> float:
        """How long to wait for the next items.

        Raises
        ------
        celery.exceptions.TimeoutError
            Once the deadline (before the registration's reply: its margin) has passed.
        """
        if self.started:
            if self.deadline.expired:
                raise _timed_out(self.watch.task_id)
            self.waited = True
            return self.deadline.block_for(self.step_cap)
        if self.grace_end is None:
            return self.step_cap
        left = self.grace_end - time.monotonic()
        if left <= 0:
            raise _timed_out(self.watch.task_id)
        return max(MIN_BLOCK, min(self.step_cap, left))

    def absorb(
        self,
        items: list[Any],
        accept: Callable[[Record], T | None],
        on_record: Callable[[Record | None, bool], None] | None = None,
    ) -> tuple[T | None, bool]:
        """Hand each record to ``on_record``; the first that ``accept`` takes, and
        whether a step ran (so ``on_step`` is due).

        Raises
        ------
        celery.exceptions.TimeoutError
            For a failure that arrives once the deadline has passed.
        PerkeyError
            For any other failure: the multiplexer gave up on the server.
        """
        found = None
        stepped, self.waited = self.waited and self.started, False
        for item in items:
            if isinstance(item, BaseException):
                if self.deadline.expired:
                    raise _timed_out(self.watch.task_id) from item
                raise item
            initial = isinstance(item, Initial)
            record = item.record if initial else item
            self.started = self.started or initial
            stepped = stepped or not initial
            if on_record is not None:
                on_record(record, initial)
            if record is not None and found is None:
                found = accept(record)
        return found, stepped


def timed_out(task_id: str) -> TimeoutError:
    """Celery's TimeoutError for a wait on ``task_id``."""
    return _timed_out(task_id)


def within_deadline(deadline: Deadline, task_id: str, call: Callable[[], T]) -> T:
    """Run ``call`` (a whole wait: its parent checks included) under ``deadline``.

    Every command our connections run meanwhile, in this thread, is bounded by it (see
    :func:`~.connection.bounded_by`): a read made by the caller's code, such as Celery's
    check of a chain's parents, ends by the deadline as the wait's own commands do.

    Raises
    ------
    celery.exceptions.TimeoutError
        For a lost connection once the deadline has passed.
    """
    try:
        with bounded_by(deadline):
            return call()
    except BackendUnavailableError as exc:
        if deadline.expired:
            raise _timed_out(task_id) from exc
        raise


def _ms(seconds: float | None) -> int:
    return int(seconds * 1000) if seconds else 0
