"""A multiplexed wait as its multiplexer sees it, and what it is handed, once each.

A :class:`Watch` is one wait's mailbox: its task's state when it was registered comes
first (an :class:`Initial`), then each new state as a
:class:`~.store.Record`, or an error. :func:`hand_on` holds the rules by which a stored
state reaches the waits of its task: each wait gets a state once, in the order it was
written, never one older than what it has, and only the kinds it asked for; a
read-once wait gets a ready result only once it was taken, and of several such waits
one gets it. The multiplexer (:mod:`.multiplex`) decides when; this module, what.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .keys import parse_ready
from .store import Record

__all__ = ["Initial", "Item", "Owner", "Watch", "hand_on"]


@dataclass(frozen=True)
class Initial:
    """The first item of a watch: the task's state when it was registered (or ``None``)."""

    record: Record | None


Item = Record | Initial | BaseException


class Owner(Protocol):
    """What serves a watch: the multiplexer it was started on."""

    def release(self, watch: Watch) -> None: ...


@dataclass(eq=False)
class Watch:
    """One wait, as the multiplexer sees it: the task, what it wants, and its mailbox.

    ``wake`` is called (from a background thread) whenever items arrive; the wait
    takes them with :meth:`take`, and releases it when done.
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
    #: The multiplexer that serves it.
    owner: Owner | None = field(default=None, repr=False)
    #: Whether its waiter can still take what arrives (``None``: as long as it lives);
    #: the full checks release those that cannot (an event loop closed by hand).
    alive: Callable[[], bool] | None = field(default=None, repr=False)

    def push(self, item: Item) -> None:
        self.items.append(item)
        self.wake()

    def take(self) -> list[Item]:
        taken = []
        while self.items:
            taken.append(self.items.popleft())
        return taken


def hand_on(
    watches: Iterable[Watch], record: Record | None, initial: bool = False, taken: bool = False
) -> bool:
    """Hand ``record`` to the ``watches`` of its task that want it, once each.

    ``initial``: the task's state at its registration, which each wait starts with
    (an :class:`Initial`); what arrives for a wait before that is handed on after it.
    A read-once wait gets a ready result only once it was taken (``taken``; ``record``
    is ``None`` when another reader took it first): of several such waits, one gets it.

    Returns
    -------
    bool
        Whether a read-once wait wants the result taken first.
    """
    take = False
    taker = True
    for watch in watches:
        if watch.consume and (taken or (record is not None and record.kind == "ready")):
            if not taken:
                # A registration renewed under a started wait starts nothing.
                watch.taking = watch.taking or (initial and not watch.started)
                take = True
                continue
            got = record if taker else None
            taker = taker and got is None
            if watch.taking:
                watch.taking = False
                _start(watch, got)
            elif got is not None:
                _pass(watch, got)
        elif initial:
            if not watch.started:
                _start(watch, record)
            elif record is not None:
                _pass(watch, record)  # another wait's registration: if new
        elif record is not None:
            _pass(watch, record)
    return take


def _start(watch: Watch, record: Record | None) -> None:
    """Start a wait with its task's state at registration, then what came since."""
    watch.started = True
    watch.shown = None if record is None else record.payload
    watch.shown_ms = _written(record)
    watch.push(Initial(record))
    early, watch.early = watch.early, []
    for later in early:
        _pass(watch, later)


def _pass(watch: Watch, record: Record) -> None:
    """Hand a state on, unless it is not new to the wait, older than what it has (a
    check's read overtaken by a notification), or not for it."""
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


def _written(record: Record | None) -> int | None:
    """When a stored state was written (server ms), from its header; ``None`` if unknown."""
    if record is None or record.kind == "fallback":
        return None
    try:
        return parse_ready(record.payload).written_ms
    except ValueError:
        return None
