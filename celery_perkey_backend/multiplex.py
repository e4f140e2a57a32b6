"""Many waits on a handful of connections: one inbox per process, no pub/sub.

A :class:`Multiplexer` serves every wait of a process (threads, greenlets, asyncio
tasks of any event loop) with two background threads on two connections:

- the *reader* blocks on the process's inbox (``BLPOP``) and hands each notification to
  the waits of its task;
- the *registrar* registers the inbox for newly waited tasks (one script per task, in
  one pipelined round trip per node: it registers and reads the task's state
  atomically, so no wake-up can fall between), takes results for read-once waits,
  unregisters finished waits, and runs the checks below.

The per-task result list stays the truth; a notification only says where to look. So
nothing is lost when a notification is: after the reader reconnects, and then every
:data:`CHECK_INTERVAL` seconds, the registrar reads every waited task again, in one
pipelined round trip, and registers again where the registration is gone (an inbox
deleted, a server restarted, a failover, a storing worker killed between its store and
its notification). While the server is out of memory (registering is a write) and for
tasks a ``redis://`` worker runs during a switch, it reads those tasks every
:data:`POLL_INTERVAL` seconds instead. A check also renews every registration older
than :data:`RENEW_AFTER`, so a registration lives as long as its waits.

Faults stay with the waits they belong to. An id no key can be made of fails its wait
before it reaches the shared pipelines; a batch that one task's keys spoil (a key of
the wrong type) is split until the culprit is found, and only its waits fail; a
malformed notification is logged and ignored. Only a connection lost past the retry
policy fails every wait.

Every round trip of the background threads runs under a deadline, as a wait's does: a
reply lost in a stalled link costs the registrar at most :data:`STEP` (plus the read
margin), and logs one warning per outage; once the link is back, every wait is read
again at once.

A multiplexer stops (its threads end, its idle connections close, its inbox goes) once
it has had no wait for :data:`IDLE_STOP` seconds, or when :func:`stop_multiplexer`
stops it (``PerkeyBackend.close()``); the next wait starts a new one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from .connection import bounded_by
from .deadline import Deadline
from .errors import (
    BackendUnavailableError,
    PerkeyError,
    ServerFullError,
    StoreCommandError,
    quote_id,
)
from .outage import Outage
from .store import Note, Probe, Record, ResultStore, parse_note
from .watches import Watch, hand_on

__all__ = [
    "CHECK_INTERVAL",
    "IDLE_STOP",
    "JOB_STEP",
    "POLL_INTERVAL",
    "RENEW_AFTER",
    "STEP",
    "Multiplexer",
    "multiplexer_for",
    "stop_multiplexer",
    "warn_server_full",
]

logger = logging.getLogger("celery_perkey_backend")

T = TypeVar("T")
R = TypeVar("R")

#: How often every waited task is read again, whatever the notifications said.
CHECK_INTERVAL = 5.0

#: How often tasks that cannot be registered (a full server) or that a ``redis://``
#: worker runs are read.
POLL_INTERVAL = 0.5

#: The longest block of the reader; it also bounds how late a stop is noticed.
READER_BLOCK = 5.0

#: How long a registration lives without being renewed by a check.
REGISTRATION_TTL_MS = 60_000

#: A check renews the registrations older than this.
RENEW_AFTER = REGISTRATION_TTL_MS / 2000

#: The deadline of each round trip of the registrar (its replies get the read margin
#: on top): a reply lost in a stalled link holds the registrar no longer.
STEP = 0.25

#: The longest deadline of a wait's read run on the registrar's connection (a join's
#: read of many results may take longer than a registration).
JOB_STEP = 2.0

#: How long a multiplexer without waits lives on before it stops.
IDLE_STOP = 30.0

#: The most tasks one pipelined round trip registers or reads.
BATCH = 1000


class Multiplexer:
    """The waits of one process on one store configuration (see the module docs).

    Parameters
    ----------
    store:
        Where the results are.
    """

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self.inbox = store.layout.inbox(uuid.uuid4().hex)
        #: The token of its read-once takes (see :meth:`_take`).
        self._token = uuid.uuid4().hex
        self.pid = os.getpid()
        #: Its key in the process's registry.
        self.ident = (id(store.client), self.pid)
        self._lock = threading.Lock()
        self._watches: dict[str, list[Watch]] = {}
        self._to_register: set[str] = set()
        self._to_unregister: set[str] = set()
        self._to_take: set[str] = set()
        self._to_read: set[str] = set()
        self._polled: set[str] = set()
        #: When each waited task was last registered (monotonic seconds).
        self._registered: dict[str, float] = {}
        self._jobs: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._work = threading.Event()
        self._watching = threading.Event()
        self._stopping = threading.Event()
        self._stopped = False
        self._idle_since: float | None = time.monotonic()
        self._check_all = False
        self._next_check = 0.0
        #: Its background threads' failures since the server last answered.
        self.outage = Outage(store.policy, quiet=READER_BLOCK + STEP + 1.0)
        self._threads = [
            threading.Thread(target=target, name=f"perkey-{name}-{self.inbox}", daemon=True)
            for name, target in (("reader", self._read_loop), ("registrar", self._register_loop))
        ]
        for thread in self._threads:
            thread.start()

    # -- for waits ----------------------------------------------------------------------

    def watch(
        self,
        task_id: str,
        wake: Callable[[], None],
        progress: bool = False,
        consume: bool = False,
        alive: Callable[[], bool] | None = None,
    ) -> Watch:
        """Start waiting on ``task_id``: its state arrives first (an :class:`~.watches.Initial`),
        then each new state as a :class:`Record`, or an error. ``alive`` says whether
        the waiter can still take them; once it says no, the wait is released.

        Raises
        ------
        InvalidIdError
            For an id no key can be made of (empty, or not valid text): it fails this
            wait alone, before it reaches the shared pipelines.
        """
        self.store.layout.watchers(task_id)  # checks the id
        watch = Watch(task_id, wake, progress, consume, owner=self, alive=alive)
        with self._lock:
            added = not self._stopped
            if added:
                watches = self._watches.setdefault(task_id, [])
                watches.append(watch)
                self._idle_since = None
                self._to_unregister.discard(task_id)
                self._to_register.add(task_id)
                self._watching.set()
        if not added:
            return multiplexer_for(self.store).watch(task_id, wake, progress, consume, alive)
        self._work.set()
        return watch

    def release(self, watch: Watch) -> None:
        """Stop a wait; the task's registration goes with its last wait."""
        if watch.owner is not None and watch.owner is not self:
            watch.owner.release(watch)
            return
        with self._lock:
            watches = self._watches.get(watch.task_id, [])
            if watch in watches:
                watches.remove(watch)
            if not watches:
                self._watches.pop(watch.task_id, None)
                self._to_register.discard(watch.task_id)
                self._to_unregister.add(watch.task_id)
                self._polled.discard(watch.task_id)
                if not self._watches:
                    self._watching.clear()
                    self._idle_since = time.monotonic()
        self._work.set()

    def call(self, job: Callable[[], T], deadline: Deadline | None = None) -> Future[T]:
        """Run ``job`` on the registrar's connection, after what is queued before it.

        It runs under ``deadline``, or :data:`JOB_STEP` when that is sooner: a job
        (a wait's read of many results) never holds the registrar much longer.
        """
        future: Future[T] = Future()

        def bounded() -> T:
            left = None if deadline is None else deadline.remaining()
            with bounded_by(Deadline(JOB_STEP if left is None else min(left, JOB_STEP))):
                return job()

        with self._lock:
            added = not self._stopped
            if added:
                self._jobs.append((bounded, future))
        if not added:
            return multiplexer_for(self.store).call(job, deadline)
        self._work.set()
        return future

    @property
    def waits(self) -> int:
        """How many waits the multiplexer serves now."""
        with self._lock:
            return sum(len(watches) for watches in self._watches.values())

    @property
    def stopped(self) -> bool:
        """Whether it stopped (its threads end; a new wait starts another)."""
        return self._stopped

    def stop(self, error: BaseException | None = None) -> bool:
        """Stop now: the waits it serves fail with ``error``; its threads end, and with
        them its registrations, its inbox and its idle connections. False: it had
        stopped already."""
        return self._halt(error or BackendUnavailableError("the multiplexer was stopped"))

    def _halt(self, error: BaseException | None) -> bool:
        """Stop; without ``error``, only if it has no waits (an idle stop)."""
        with _registry_lock:
            with self._lock:
                if self._stopped or (error is None and (self._watches or self._jobs)):
                    return False
                self._stopped = True
                watches = [watch for group in self._watches.values() for watch in group]
                jobs = list(self._jobs)
                self._jobs.clear()
            if _multiplexers.get(self.ident) is self:
                del _multiplexers[self.ident]
        self._stopping.set()
        self._work.set()
        self._watching.set()
        failure = error or BackendUnavailableError("the multiplexer was stopped")
        for watch in watches:  # none without an error: an idle stop
            watch.push(failure)
        for _, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(failure)
        return True

    def _finish(self) -> None:
        """The registrar's last work: unregister, wait for the reader, let go of the
        inbox and the connections (best effort: registrations and inboxes expire)."""
        with self._lock:
            ids = list(self._registered)
            self._registered.clear()
        with contextlib.suppress(PerkeyError):
            for start in range(0, len(ids), BATCH):
                self._step(self.store.unregister, ids[start : start + BATCH], self.inbox)
        reader = self._threads[0]
        if reader is not threading.current_thread():
            reader.join(READER_BLOCK + STEP + 1.0)
        with contextlib.suppress(PerkeyError):
            self._step(self.store.delete, self.inbox)
        with contextlib.suppress(PerkeyError):
            self.store.close_idle()

    @staticmethod
    def _step(op: Callable[..., T], *args: Any) -> T:
        """One round trip of the registrar, under a deadline of :data:`STEP`."""
        with bounded_by(Deadline(STEP)):
            return op(*args)

    # -- handing on what arrives --------------------------------------------------------

    def _deliver(
        self, task_id: str, record: Record | None, initial: bool = False, taken: bool = False
    ) -> None:
        """Hand ``record`` to the waits of ``task_id`` (:func:`~.watches.hand_on`); a
        read-once wait that wants it taken first has the registrar take it."""
        with self._lock:
            watches = list(self._watches.get(task_id, ()))
        if hand_on(watches, record, initial, taken):
            self._want(self._to_take, task_id)

    def _fail(self, error: BaseException) -> None:
        """Fail every wait (the connection stayed lost past the retry policy)."""
        with self._lock:
            watches = [watch for group in self._watches.values() for watch in group]
        for watch in watches:
            watch.push(error)

    def _want(self, queue: set[str], task_id: str) -> None:
        with self._lock:
            queue.add(task_id)
        self._work.set()

    # -- the reader ---------------------------------------------------------------------

    def _read_loop(self) -> None:
        lost = False
        while not self._stopping.is_set():
            if not self._watching.wait(READER_BLOCK) or self._stopping.is_set():
                continue
            try:
                # The block's reply is read within its block plus the read margin; the
                # deadline bounds a reconnect's handshake as well.
                with bounded_by(Deadline(READER_BLOCK)):
                    first = self.store.pop_inbox(self.inbox, READER_BLOCK)
                if lost:
                    # Notifications may have gone with the connection: check every task.
                    lost = False
                    self._recovered()
                if first is None:
                    continue
                # The first is handed on before the others are fetched: a lone wake-up
                # must not wait for a second round trip.
                self._handle(first)
                for raw in self._step(self.store.take_inbox, self.inbox, BATCH - 1):
                    self._handle(raw)
            except StoreCommandError as exc:
                # The inbox is ours, and holds something else (written by hand): make it
                # anew. What was in it is lost; a check reads every waited task.
                logger.warning("perkey: replaced inbox %s, which was refused: %s", self.inbox, exc)
                with contextlib.suppress(PerkeyError):
                    self._step(self.store.delete, self.inbox)
                self._recovered()
                self._stopping.wait(POLL_INTERVAL)
            except PerkeyError as exc:
                if self._stopping.is_set():
                    break
                lost = True
                self._stopping.wait(self._trouble(exc))

    def _handle(self, raw: bytes) -> None:
        try:
            note = parse_note(raw)
        except ValueError:
            logger.warning(
                "perkey: ignored a malformed notification in %s: %s",
                self.inbox,
                quote_id(raw),
            )
            return
        self._noted(note)

    def _noted(self, note: Note) -> None:
        if note.element is None:
            self._want(self._to_read, note.task_id)  # too large to carry: read it
            return
        layout = self.store.layout
        key = layout.result(note.task_id) if note.ready else layout.state(note.task_id)
        self._deliver(
            note.task_id,
            Record(note.task_id, key, note.element, "ready" if note.ready else "progress"),
        )

    def _trouble(self, exc: PerkeyError) -> float:
        """Note a failure (see :class:`~.outage.Outage`): past the retry policy, every
        wait fails with it. How long to pause before trying again."""
        with self._lock:
            waits = bool(self._watches)
        give_up, pause = self.outage.failed(exc, waits)
        if give_up:
            self._fail(exc)
        return pause

    def _recovered(self) -> None:
        self.outage.ok()
        with self._lock:
            self._check_all = True
        self._work.set()

    # -- the registrar -------------------------------------------------------------------

    def _register_loop(self) -> None:
        while not self._stopping.is_set():
            self._work.wait(self._until_next())
            self._work.clear()
            if self._stopping.is_set():
                break
            try:
                self._run_jobs()
                self._register()
                self._take()
                self._read()
                self._unregister()
                self._check()
            except PerkeyError as exc:
                # Short pauses: each attempt is bounded by a step already, and a link
                # that heals must serve waits again within about one step.
                self._stopping.wait(min(self._trouble(exc), STEP))
                with self._lock:
                    self._check_all = True
                self._work.set()
                continue
            if self.outage.failures:
                self.outage.ok()
            self._stop_if_idle()
        self._finish()

    def _stop_if_idle(self) -> None:
        with self._lock:
            since = self._idle_since
        if since is not None and time.monotonic() - since >= IDLE_STOP:
            self._halt(None)

    def _until_next(self) -> float:
        now = time.monotonic()
        with self._lock:
            polled = bool(self._polled)
            since = self._idle_since
        left = self._next_check - now
        wait = max(0.0, min(left, POLL_INTERVAL) if polled else left)
        if since is not None:
            wait = min(wait, max(0.0, since + IDLE_STOP - now))
        return wait or 0.01

    def _release_dead(self) -> None:
        """Release the waits whose waiters can take nothing any more."""
        with self._lock:
            dead = [
                watch
                for group in self._watches.values()
                for watch in group
                if watch.alive is not None and not watch.alive()
            ]
        for watch in dead:
            self.release(watch)

    def _drain(self, queue: set[str]) -> list[str]:
        with self._lock:
            ids = [task_id for task_id in queue if task_id in self._watches]
            queue.clear()
        return ids

    def _run_jobs(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    return
                job, future = self._jobs.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as exc:
                    future.set_exception(exc)

    def _isolated(self, ids: list[str], op: Callable[[list[str]], dict[str, R]]) -> dict[str, R]:
        """``op`` on ``ids``, each call a step of its own; a batch that one task's keys
        spoil is split until the culprits are found, and only their waits fail.

        Raises
        ------
        PerkeyError
            What fails the whole batch: a lost connection, a full server.
        """
        try:
            return self._step(op, ids)
        except ServerFullError:
            raise
        except StoreCommandError as exc:
            if len(ids) == 1:
                self._fail_task(ids[0], exc)
                return {}
        half = len(ids) // 2
        found = self._isolated(ids[:half], op)
        found.update(self._isolated(ids[half:], op))
        return found

    def _fail_task(self, task_id: str, error: BaseException) -> None:
        """Fail the waits of one task, and forget its registration."""
        with self._lock:
            watches = list(self._watches.get(task_id, ()))
            self._polled.discard(task_id)
            self._registered.pop(task_id, None)
        for watch in watches:
            watch.push(error)

    def _register(self) -> None:
        ids = self._drain(self._to_register)
        for start in range(0, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            try:
                probes = self._isolated(
                    chunk, lambda part: self.store.register(part, self.inbox, REGISTRATION_TTL_MS)
                )
            except ServerFullError as exc:
                # Registering is a write: poll these until the server has room.
                warn_server_full(exc)
                with self._lock:
                    self._polled.update(chunk)
                probes = self._isolated(chunk, lambda part: self.store.probe(part, self.inbox))
            except PerkeyError:
                with self._lock:
                    self._to_register.update(chunk)
                raise
            else:
                now = time.monotonic()
                with self._lock:
                    self._polled.difference_update(probes)
                    for task_id in probes:
                        if task_id in self._watches:
                            self._registered[task_id] = now
            for task_id, probe in probes.items():
                self._show(task_id, probe, initial=True)

    def _show(self, task_id: str, probe: Probe, initial: bool = False, states: bool = True) -> None:
        """Hand on what a registration or a check read: the result, else (with
        ``states``) the intermediate state or the fallback key's value."""
        record = probe.ready or (probe.state or probe.fallback if states else None)
        if probe.ready is None and probe.fallback is not None:
            # A redis:// worker has it (a switch in progress): it sends no notification.
            with self._lock:
                if task_id in self._watches:
                    self._polled.add(task_id)
        self._deliver(task_id, record, initial)

    def _take(self) -> None:
        ids = self._drain(self._to_take)
        if not ids:
            return
        # Every take of this multiplexer carries its one token: a take retried after a
        # lost reply (in the next round, once the link answers) gets back what the lost
        # one took (lua/take.lua). The ids of a failed round are taken in the next.
        try:
            taken = self._isolated(
                ids, lambda part: self.store.read_ready(part, consume=True, token=self._token)
            )
        except PerkeyError:
            with self._lock:
                self._to_take.update(ids)
            raise
        for task_id in ids:
            record = taken.get(task_id)
            self._deliver(
                task_id, record if record and record.kind == "ready" else None, taken=True
            )

    def _read(self) -> None:
        ids = self._drain(self._to_read)
        if ids:
            probes = self._isolated(ids, lambda part: self.store.probe(part, self.inbox))
            for task_id, probe in probes.items():
                self._show(task_id, probe)

    def _unregister(self) -> None:
        with self._lock:
            ids = [task_id for task_id in self._to_unregister if task_id not in self._watches]
            self._to_unregister.clear()
            for task_id in ids:
                self._registered.pop(task_id, None)
        for start in range(0, len(ids), BATCH):
            with contextlib.suppress(PerkeyError):  # registrations expire anyway
                self._step(self.store.unregister, ids[start : start + BATCH], self.inbox)

    def _check(self) -> None:
        """Read the polled tasks; on a full check (after a reconnect, and every
        :data:`CHECK_INTERVAL`), every waited task, registering again where the
        registration is gone or older than :data:`RENEW_AFTER`."""
        now = time.monotonic()
        with self._lock:
            every = self._check_all or now >= self._next_check
            ids = list(self._watches) if every else [i for i in self._polled if i in self._watches]
            self._check_all = False
            if every:
                renew = [
                    task_id
                    for task_id, since in self._registered.items()
                    if now - since >= RENEW_AFTER and task_id in self._watches
                ]
                self._to_register.update(renew)
        if every:
            self._next_check = now + CHECK_INTERVAL
            self._release_dead()
        for start in range(0, len(ids), BATCH):
            probes = self._isolated(
                ids[start : start + BATCH], lambda part: self.store.probe(part, self.inbox)
            )
            for task_id, probe in probes.items():
                # A registered task's states come as notifications, in order: a check
                # hands on only a result, or the states of tasks it must poll.
                with self._lock:
                    polled = task_id in self._polled
                self._show(task_id, probe, states=polled or not probe.registered)
                if every and not probe.registered and probe.ready is None:
                    # An inbox deleted, a restart, a failover, a server that was full.
                    self._want(self._to_register, task_id)
        with self._lock:
            again = bool(self._to_register)
        if again:
            self._work.set()


_full_warned = threading.Event()


def warn_server_full(error: Exception) -> None:
    """Say once per process that waits poll because the server is out of memory."""
    if not _full_warned.is_set():
        _full_warned.set()
        logger.warning(
            "perkey: the server is out of memory (%s); waits read at most every %.1f s "
            "instead of blocking until it has room",
            error,
            POLL_INTERVAL,
        )


_multiplexers: dict[tuple[int, int], Multiplexer] = {}
_registry_lock = threading.Lock()


def _fresh_registry() -> None:
    """In a forked child: no multiplexer of the parent's (their threads did not come
    along; a wait there starts one of its own), and a lock of its own."""
    global _registry_lock
    _registry_lock = threading.Lock()
    _multiplexers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_registry)


def multiplexer_for(store: ResultStore) -> Multiplexer:
    """The process's multiplexer for the store's client (a new one after a fork, or
    after the last one stopped)."""
    ident = (id(store.client), os.getpid())
    with _registry_lock:
        found = _multiplexers.get(ident)
        if found is None:
            found = _multiplexers[ident] = Multiplexer(store)
        return found


def stop_multiplexer(store: ResultStore, error: BaseException | None = None) -> bool:
    """Stop the process's multiplexer for the store's client, if one runs: its waits
    fail with ``error``, its threads end and its idle connections close. A later wait
    starts a new one. False: none ran."""
    with _registry_lock:
        found = _multiplexers.get((id(store.client), os.getpid()))
    return found is not None and found.stop(error)
