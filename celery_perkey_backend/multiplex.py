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
:data:`POLL_INTERVAL` seconds instead.
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
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import BackendUnavailableError, PerkeyError, ServerFullError
from .keys import parse_ready
from .store import Note, Probe, Record, ResultStore, parse_note

__all__ = [
    "CHECK_INTERVAL",
    "POLL_INTERVAL",
    "Initial",
    "Multiplexer",
    "Watch",
    "multiplexer_for",
    "warn_server_full",
]

logger = logging.getLogger("celery_perkey_backend")

T = TypeVar("T")

#: How often every waited task is read again, whatever the notifications said.
CHECK_INTERVAL = 5.0

#: How often tasks that cannot be registered (a full server) or that a ``redis://``
#: worker runs are read.
POLL_INTERVAL = 0.5

#: The longest block of the reader; it also bounds how late a stop is noticed.
READER_BLOCK = 5.0

#: How long a registration lives without being renewed by a check.
REGISTRATION_TTL_MS = 60_000

#: The most tasks one pipelined round trip registers or reads.
BATCH = 1000


@dataclass(frozen=True)
class Initial:
    """The first item of a watch: the task's state when it was registered (or ``None``)."""

    record: Record | None


Item = Record | Initial | BaseException


@dataclass(eq=False)
class Watch:
    """One wait, as the multiplexer sees it: the task, what it wants, and its mailbox.

    ``wake`` is called (from a background thread) whenever items arrive; the wait
    takes them with :meth:`take`.
    """

    task_id: str
    wake: Callable[[], None]
    progress: bool = False
    consume: bool = False
    items: deque[Item] = field(default_factory=deque)
    shown: bytes | None = None
    #: Whether its :class:`Initial` was handed on.
    started: bool = False
    #: Notifications that came before its registration's reply: handed on after it.
    early: list[Record] = field(default_factory=list)
    #: A read-once wait whose registration found the result: it starts with the take.
    taking: bool = False
    #: When the state it has last was written (server ms; ``None``: unknown).
    shown_ms: int | None = None

    def push(self, item: Item) -> None:
        self.items.append(item)
        self.wake()

    def take(self) -> list[Item]:
        taken = []
        while self.items:
            taken.append(self.items.popleft())
        return taken


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
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._watches: dict[str, list[Watch]] = {}
        self._to_register: set[str] = set()
        self._to_unregister: set[str] = set()
        self._to_take: set[str] = set()
        self._to_read: set[str] = set()
        self._polled: set[str] = set()
        self._jobs: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._work = threading.Event()
        self._watching = threading.Event()
        self._check_all = False
        self._next_check = 0.0
        self._failures = 0
        for name, target in (("reader", self._read_loop), ("registrar", self._register_loop)):
            thread = threading.Thread(
                target=target, name=f"perkey-{name}-{self.inbox}", daemon=True
            )
            thread.start()

    # -- for waits ----------------------------------------------------------------------

    def watch(
        self, task_id: str, wake: Callable[[], None], progress: bool = False, consume: bool = False
    ) -> Watch:
        """Start waiting on ``task_id``: its state arrives first (an :class:`Initial`),
        then each new state as a :class:`Record`, or an error."""
        watch = Watch(task_id, wake, progress, consume)
        with self._lock:
            watches = self._watches.setdefault(task_id, [])
            watches.append(watch)
            self._to_unregister.discard(task_id)
            self._to_register.add(task_id)
            self._watching.set()
        self._work.set()
        return watch

    def release(self, watch: Watch) -> None:
        """Stop a wait; the task's registration goes with its last wait."""
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
        self._work.set()

    def call(self, job: Callable[[], T]) -> Future[T]:
        """Run ``job`` on the registrar's connection, after what is queued before it."""
        future: Future[T] = Future()
        with self._lock:
            self._jobs.append((job, future))
        self._work.set()
        return future

    @property
    def waits(self) -> int:
        """How many waits the multiplexer serves now."""
        with self._lock:
            return sum(len(watches) for watches in self._watches.values())

    # -- handing on what arrives --------------------------------------------------------

    def _deliver(
        self, task_id: str, record: Record | None, initial: bool = False, taken: bool = False
    ) -> None:
        """Hand ``record`` to the waits of ``task_id`` that want it, once each.

        ``initial``: the task's state at its registration, which each wait starts with
        (an :class:`Initial`); what arrives for a wait before that is handed on after
        it. A read-once wait gets a ready result only once the registrar has taken it
        (``taken``; ``None`` when another reader took it first): of several such waits
        here, one gets it.
        """
        with self._lock:
            watches = list(self._watches.get(task_id, ()))
        taker = True
        for watch in watches:
            if watch.consume and (taken or (record is not None and record.kind == "ready")):
                if not taken:
                    watch.taking = watch.taking or initial
                    self._want(self._to_take, task_id)
                    continue
                got = record if taker else None
                taker = taker and got is None
                if watch.taking:
                    watch.taking = False
                    self._start(watch, got)
                elif got is not None:
                    self._pass(watch, got)
            elif initial:
                if not watch.started:
                    self._start(watch, record)
                elif record is not None:
                    self._pass(watch, record)  # another wait's registration: if new
            elif record is not None:
                self._pass(watch, record)

    @staticmethod
    def _start(watch: Watch, record: Record | None) -> None:
        """Start a wait with its task's state at registration, then what came since."""
        watch.started = True
        watch.shown = None if record is None else record.payload
        watch.shown_ms = _written(record)
        watch.push(Initial(record))
        early, watch.early = watch.early, []
        for later in early:
            Multiplexer._pass(watch, later)

    @staticmethod
    def _pass(watch: Watch, record: Record) -> None:
        """Hand a state on, unless it is not new to the wait, older than what it has
        (a check's read overtaken by a notification), or not for it."""
        if not watch.started:
            watch.early.append(record)  # its registration's reply is still on its way
            return
        written = _written(record)
        older = written is not None and watch.shown_ms is not None and written < watch.shown_ms
        wanted = watch.progress or record.kind != "progress"
        if record.payload != watch.shown and wanted and not older:
            watch.shown = record.payload
            watch.shown_ms = written
            watch.push(record)

    def _fail(self, error: BaseException) -> None:
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
        while True:
            if not self._watching.wait(READER_BLOCK):
                continue
            try:
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
                for raw in self.store.take_inbox(self.inbox, BATCH - 1):
                    self._handle(raw)
            except PerkeyError as exc:
                lost = self._trouble(exc, lost)

    def _handle(self, raw: bytes) -> None:
        try:
            note = parse_note(raw)
        except (ValueError, UnicodeDecodeError):
            logger.warning("perkey: ignored a malformed notification in %s", self.inbox)
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

    def _trouble(self, exc: PerkeyError, lost: bool) -> bool:
        """Note a failure; past the retry policy, fail every wait with it. True: lost."""
        with self._lock:
            self._failures += 1
            failures = self._failures
        limit = self.store.policy.max_retries
        if not lost:
            logger.warning("perkey: waits lost their connection (%s); retrying", exc)
        if not isinstance(exc, BackendUnavailableError) or (limit is not None and failures > limit):
            self._fail(exc)
            with self._lock:
                self._failures = 0
        time.sleep(min(1.0, 0.05 * 2 ** min(failures, 5)))
        return True

    def _recovered(self) -> None:
        self._failures = 0
        with self._lock:
            self._check_all = True
        self._work.set()

    # -- the registrar -------------------------------------------------------------------

    def _register_loop(self) -> None:
        while True:
            self._work.wait(self._until_next())
            self._work.clear()
            try:
                self._run_jobs()
                self._register()
                self._take()
                self._read()
                self._unregister()
                self._check()
                self._failures = 0
            except PerkeyError as exc:
                self._trouble(exc, True)  # pauses before the next attempt
                with self._lock:
                    self._check_all = True
                self._work.set()

    def _until_next(self) -> float:
        with self._lock:
            polled = bool(self._polled)
        left = self._next_check - time.monotonic()
        return max(0.0, min(left, POLL_INTERVAL) if polled else left) or 0.01

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

    def _register(self) -> None:
        ids = self._drain(self._to_register)
        for start in range(0, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            try:
                probes = self.store.register(chunk, self.inbox, REGISTRATION_TTL_MS)
            except ServerFullError as exc:
                # Registering is a write: poll these until the server has room.
                warn_server_full(exc)
                with self._lock:
                    self._polled.update(chunk)
                probes = self.store.probe(chunk, self.inbox)
            except PerkeyError:
                with self._lock:
                    self._to_register.update(chunk)
                raise
            else:
                with self._lock:
                    self._polled.difference_update(chunk)
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
        # One token for the take and its retries: a retry after a lost reply gets back
        # what the lost attempt took. Past the retry policy the ids wait for the next
        # round (what a lost attempt took then stays with it, until its copy expires).
        token = uuid.uuid4().hex
        try:
            taken = self.store.policy.call(
                lambda: self.store.read_ready(ids, consume=True, token=token), "take results"
            )
        except BackendUnavailableError:
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
            for task_id, probe in self.store.probe(ids, self.inbox).items():
                self._show(task_id, probe)

    def _unregister(self) -> None:
        with self._lock:
            ids = [task_id for task_id in self._to_unregister if task_id not in self._watches]
            self._to_unregister.clear()
        for start in range(0, len(ids), BATCH):
            with contextlib.suppress(PerkeyError):  # registrations expire anyway
                self.store.unregister(ids[start : start + BATCH], self.inbox)

    def _check(self) -> None:
        """Read the polled tasks; on a full check (after a reconnect, and every
        :data:`CHECK_INTERVAL`), every waited task, registering again where the
        registration is gone."""
        now = time.monotonic()
        with self._lock:
            every = self._check_all or now >= self._next_check
            ids = list(self._watches) if every else [i for i in self._polled if i in self._watches]
            self._check_all = False
        if every:
            self._next_check = now + CHECK_INTERVAL
        for start in range(0, len(ids), BATCH):
            for task_id, probe in self.store.probe(ids[start : start + BATCH], self.inbox).items():
                # A registered task's states come as notifications, in order: a check
                # hands on only a result, or the states of tasks it must poll.
                with self._lock:
                    polled = task_id in self._polled
                self._show(task_id, probe, states=polled or not probe.registered)
                if every and not probe.registered and probe.ready is None:
                    # An inbox deleted, a restart, a failover, a server that was full.
                    self._want(self._to_register, task_id)


def _written(record: Record | None) -> int | None:
    """When a stored state was written (server ms), from its header; ``None`` if unknown."""
    if record is None or record.kind == "fallback":
        return None
    try:
        return parse_ready(record.payload).written_ms
    except ValueError:
        return None


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


def multiplexer_for(store: ResultStore) -> Multiplexer:
    """The process's multiplexer for the store's client (a new one after a fork)."""
    ident = (id(store.client), os.getpid())
    with _registry_lock:
        found = _multiplexers.get(ident)
        if found is None:
            found = _multiplexers[ident] = Multiplexer(store)
        return found
