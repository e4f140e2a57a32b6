"""The sweep: find the keys of ours that slipped through, and fix them gently.

Every entry point (``backend.cleanup()``, the ``celery_perkey_backend.sweep`` task, the
``celery perkey sweep`` command) runs :func:`sweep`. It walks only our own keys (SCAN
with an escaped MATCH on the prefix), under a lock that keeps two sweeps from
overlapping, in batches with optional pauses, and acts only through a script that
checks again, atomically, that the action is still right for the key.

It also finds *stalled chords*: a chord whose header is complete but whose body was
never marked published, past its claim's deadline (every worker that could have
published it died). The sweep knows nothing of Celery: it hands each one to a
``repair`` hook, which the Celery backend provides (``PerkeyBackend.run_sweep``), and
counts what the hook did. Without a hook it only counts them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import redis

from . import scripts
from .errors import ConfigurationError
from .keys import KeyLayout
from .settings import Settings, parse_count, parse_duration, parse_flag
from .store import ResultStore

__all__ = [
    "CLASSES",
    "ChordRepair",
    "HasStore",
    "KeyBatch",
    "SweepOptions",
    "SweepSummary",
    "key_batches",
    "stalled_chords",
    "store_of",
    "sweep",
]

logger = logging.getLogger(__name__)

#: Every class a key can fall in, in report order.
CLASSES = ("healthy", "no_ttl", "too_old", "leftover", "unexpected")

#: What the sweep script's class letters stand for.
CLASS_LETTERS = {
    "H": "healthy",
    "N": "no_ttl",
    "O": "too_old",
    "L": "leftover",
    "U": "unexpected",
}

#: How many planned actions a dry run lists (the counts are always complete).
PLAN_LIMIT = 1000

#: Publishes (or fails) the body of a stalled chord, given its group id, and says what
#: it did: "repaired", "settled" (it had been published), "failed" or "skipped".
ChordRepair = Callable[[str], str]


class HasStore(Protocol):
    """Anything that carries a result store, such as the Celery backend."""

    @property
    def store(self) -> ResultStore: ...


def store_of(target: ResultStore | HasStore) -> ResultStore:
    """The store itself, or the one that ``target`` carries."""
    return target if isinstance(target, ResultStore) else target.store


@dataclass(frozen=True)
class SweepOptions:
    """How a sweep behaves: the ``perkey_sweep_*`` settings, or overrides of them.

    Parameters
    ----------
    max_age:
        Seconds after its last write at which a key counts as too old.
    delete:
        UNLINK too-old keys (past ``max_age``) instead of only giving TTL-less keys a TTL.
    ttl:
        The TTL, in seconds, given to keys that have none.
    dry_run:
        Decide everything, change nothing, and list what would be done.
    scan_count:
        SCAN's COUNT hint; by default the batch size. A page is fetched in the same round
        trip as a batch, so a COUNT far above the batch size makes that step hold the
        server longer.
    batch_size:
        Keys inspected (and fixed) per script call.
    pause:
        Seconds to sleep between batches, to keep other clients' latency flat.
    lock_ttl:
        Seconds the sweep lock lives without renewal; a crashed sweeper's lock expires.
    memory_samples:
        How many removed keys are weighed with MEMORY USAGE to estimate bytes reclaimed.
    chords_only:
        Look only for stalled chords (SCAN matches only chords' claim keys), and leave
        every other key alone: cheap enough to schedule every minute or so.
    """

    max_age: float
    delete: bool
    ttl: float
    scan_count: int
    batch_size: int
    pause: float
    lock_ttl: float
    memory_samples: int
    dry_run: bool = False
    chords_only: bool = False

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> SweepOptions:
        """The settings' sweep options, with ``overrides`` (``None`` keeps a setting).

        Raises
        ------
        ConfigurationError
            If an option is unknown or its value cannot be read.
        """
        readers: dict[str, tuple[Callable[[Any, str], Any], Any]] = {
            "max_age": (parse_duration, settings.sweep_max_age_s),
            "delete": (parse_flag, settings.sweep_delete),
            "ttl": (parse_duration, settings.sweep_ttl_s),
            "scan_count": (lambda v, n: parse_count(v, n, 1), settings.sweep_scan_count),
            "batch_size": (lambda v, n: parse_count(v, n, 1), settings.sweep_batch_size),
            "pause": (parse_duration, settings.sweep_pause_s),
            "lock_ttl": (parse_duration, settings.sweep_lock_ttl_s),
            "memory_samples": (parse_count, settings.sweep_memory_samples),
            "dry_run": (parse_flag, False),
            "chords_only": (parse_flag, False),
        }
        unknown = set(overrides) - set(readers)
        if unknown:
            raise ConfigurationError(f"unknown sweep option(s): {', '.join(sorted(unknown))}")
        values = {
            name: default if overrides.get(name) is None else read(overrides[name], name)
            for name, (read, default) in readers.items()
        }
        if values["scan_count"] is None:  # no COUNT set: the batch size, as overridden
            values["scan_count"] = values["batch_size"]
        return cls(**values)


@dataclass
class SweepSummary:
    """What one sweep saw and did."""

    scanned: int = 0
    by_class: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))
    ttl_set: int = 0
    unlinked: int = 0
    bytes_reclaimed: int = 0
    duration: float = 0.0
    skipped_locked: bool = False
    dry_run: bool = False
    planned: list[tuple[str, str]] = field(default_factory=list)  # the first PLAN_LIMIT
    planned_total: int = 0  # every action a dry run would take; more than listed past the limit
    chords_stalled: int = 0
    chords_repaired: int = 0
    chords_settled: int = 0
    chords_failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """The one-line summary the sweep logs."""
        if self.skipped_locked:
            return "perkey sweep: skipped, another sweep holds the lock"
        classes = " ".join(f"{name}={self.by_class[name]}" for name in CLASSES)
        verb = "would set" if self.dry_run else "set"
        gone = "would unlink" if self.dry_run else "unlinked"
        chords = f"chords stalled={self.chords_stalled}"
        if not self.dry_run:
            chords += (
                f" repaired={self.chords_repaired} settled={self.chords_settled}"
                f" failed={self.chords_failed}"
            )
        return (
            f"perkey sweep: scanned={self.scanned} {classes} ttl {verb}={self.ttl_set} "
            f"{gone}={self.unlinked} reclaimed~{self.bytes_reclaimed}B {chords} "
            f"in {self.duration:.3f}s" + (" (dry run)" if self.dry_run else "")
        )


def sweep(
    target: ResultStore | HasStore,
    progress: Callable[[int, int], None] | None = None,
    repair: ChordRepair | None = None,
    **overrides: Any,
) -> SweepSummary:
    """Run one sweep over the keys of a store (or of the backend that carries it).

    Parameters
    ----------
    progress:
        Called after each batch with ``(keys scanned, keys in the database)``.
    repair:
        Called with the group id of each stalled chord found (not in a dry run);
        without it, stalled chords are only counted.
    overrides:
        Any :class:`SweepOptions` field; the rest come from the ``perkey_sweep_*``
        settings.

    Returns
    -------
    SweepSummary
        Counts by class, actions taken (or planned, in a dry run), duration, and
        whether the sweep was skipped because another one held the lock.

    Raises
    ------
    BackendUnavailableError
        If the server cannot be reached.
    ConfigurationError
        If an override is unknown or unreadable.
    """
    store = store_of(target)
    options = SweepOptions.from_settings(store.settings, **overrides)
    summary = SweepSummary(dry_run=options.dry_run)
    started = time.monotonic()
    lock = store.layout.sweep_lock
    token = uuid.uuid4().hex
    lock_ms = max(1, int(options.lock_ttl * 1000))
    if not store.take_lock(lock, token, lock_ms):
        summary.skipped_locked = True
        logger.info(summary.line())
        return summary
    try:
        _run(store, options, summary, progress, token, lock_ms, repair)
    finally:
        store.release_lock(lock, token)
    summary.duration = time.monotonic() - started
    logger.info(summary.line())
    return summary


@dataclass(frozen=True)
class KeyBatch:
    """Keys that one script call may look at together (they share a slot).

    ``keys`` are the batch's keys (``indexes`` says where each came from), then the
    chord size keys they refer to, declared so that the call stays within its slot.
    ``kinds`` has one kind code per batch key (``-`` for keys to skip); ``sizes`` says,
    per batch key, the 1-based KEYS index of its chord's size key, or 0.
    """

    indexes: list[int]
    keys: list[str]
    kinds: str
    sizes: str


def key_batches(store: ResultStore, names: Sequence[str]) -> list[KeyBatch]:
    """``names`` split into one :class:`KeyBatch` per slot group."""
    layout: KeyLayout = store.layout
    batches = []
    for group in store.slot_groups(names):
        batch = [names[index] for index in group]
        kinds = [layout.kind_of(name) for name in batch]
        sizes: dict[str, int] = {}
        refs = []
        for name, kind in zip(batch, kinds, strict=True):
            size = layout.chord_size_key(name, kind) if kind else None
            if size is None:
                refs.append("0")
            else:
                refs.append(str(sizes.setdefault(size, len(batch) + len(sizes) + 1)))
        batches.append(
            KeyBatch(
                indexes=group,
                keys=[*batch, *sizes],
                kinds="".join(kind or "-" for kind in kinds),
                sizes=",".join(refs),
            )
        )
    return batches


@dataclass(frozen=True)
class _Lock:
    """The sweep lock as each batch's script checks and renews it."""

    key: str
    token: str
    ttl_ms: int


def _run(
    store: ResultStore,
    options: SweepOptions,
    summary: SweepSummary,
    progress: Callable[[int, int], None] | None,
    token: str,
    lock_ms: int,
    repair: ChordRepair | None,
) -> None:
    start_ms = store.server_time_ms()
    # Only keys last written before both the sweep's start and max_age ago may go.
    cutoff_ms = start_ms - int(options.max_age * 1000)
    total = store.dbsize()
    ttl_ms = max(1, int(options.ttl * 1000))
    weighed = [0, 0]  # bytes, keys weighed with MEMORY USAGE before unlinking
    lock = _Lock(store.layout.sweep_lock, token, lock_ms)
    # On one server, each batch's script checks and renews the lock itself, atomically
    # with the batch. A cluster's batches run on other nodes than the lock's, so there
    # the lock is renewed by a call of its own before each batch.
    in_script = not store.is_cluster
    layout = store.layout
    pattern = layout.match_chord_claims if options.chords_only else layout.match_all
    size, count = options.batch_size, options.scan_count
    first = True
    for node in store.primaries():
        cursor, pending = store.scan_page(node, 0, pattern, count)
        while pending or cursor:
            if cursor and len(pending) < size:
                cursor, page = store.scan_page(node, cursor, pattern, count)
                pending.extend(page)
                continue
            batch, pending = pending[:size], pending[size:]
            checked = in_script and not options.chords_only
            if not first:
                if options.pause:
                    time.sleep(options.pause)
                if not checked and not store.renew_lock(lock.key, token, lock_ms):
                    logger.warning("perkey sweep: lost its lock, stopping early")
                    return
            first = False
            if not options.chords_only:
                # When the next batch needs another page, it comes in this batch's round
                # trip.
                scan = (cursor, pattern, count) if cursor and len(pending) < size else None
                held, more = _batch(
                    store, node, batch, options, summary, cutoff_ms, ttl_ms, weighed,
                    lock if checked else None, scan,
                )  # fmt: skip
                if not held:
                    logger.warning("perkey sweep: lost its lock, stopping early")
                    return
                if more is not None:
                    cursor, page = more
                    pending.extend(page)
            _chords(store, node, batch, options, summary, repair)
            if progress:
                progress(summary.scanned, total)
    if weighed[1]:
        summary.bytes_reclaimed = int(weighed[0] / weighed[1] * summary.unlinked)


def _batch(
    store: ResultStore,
    node: redis.Redis,
    batch: list[str],
    options: SweepOptions,
    summary: SweepSummary,
    cutoff_ms: int,
    ttl_ms: int,
    weighed: list[int],
    lock: _Lock | None,
    scan: tuple[int, str, int] | None,
) -> tuple[bool, tuple[int, list[str]] | None]:
    """Classify and fix one batch (and fetch the page ``scan`` names, if any).

    Returns whether the sweep still held its lock, and the page.
    """
    batches = key_batches(store, batch)
    calls = []
    for part in batches:
        keys = part.keys if lock is None else [*part.keys, lock.key]
        calls.append(
            scripts.SWEEP_BATCH.bind(
                {"keys": keys},
                {
                    "fix": "0" if options.dry_run else "1",
                    "delete": "1" if options.delete else "0",
                    "ttl_ms": ttl_ms,
                    "cutoff_ms": cutoff_ms,
                    "weigh": max(0, options.memory_samples - weighed[1]),
                    "count": len(part.indexes),
                    "kinds": part.kinds,
                    "sizes": part.sizes,
                    "lock": 0 if lock is None else len(keys),
                    "token": "" if lock is None else lock.token,
                    "lock_ms": 0 if lock is None else lock.ttl_ms,
                },
            )
        )
    replies, page = store.run_scripts_and_scan(node, scripts.SWEEP_BATCH, calls, "sweep", scan)
    held = True
    for part, (classes, actions, size, count, owned) in zip(batches, replies, strict=True):
        if not int(owned):
            held = False
            continue
        classes, actions = classes.decode(), actions.decode()
        weighed[0] += int(size)
        weighed[1] += int(count)
        for letter, name in CLASS_LETTERS.items():
            summary.by_class[name] += classes.count(letter)
        summary.scanned += len(classes) - classes.count("-")
        summary.ttl_set += actions.count("t")
        summary.unlinked += actions.count("u")
        if options.dry_run:
            for index, action in zip(part.indexes, actions, strict=True):
                if action == ".":
                    continue
                summary.planned_total += 1
                if len(summary.planned) < PLAN_LIMIT:
                    summary.planned.append(("ttl" if action == "t" else "unlink", batch[index]))
    return held, page


def stalled_chords(store: ResultStore, node: redis.Redis, names: Sequence[str]) -> list[str]:
    """The group ids of the stalled chords among ``names`` (keys that ``node`` holds).

    Each chord is judged by its claim key, which every complete chord has.
    """
    layout = store.layout
    groups = [layout.chord_group(name) for name in names if layout.kind_of(name) == "c"]
    return store.stalled_chords(node, [group_id for group_id in groups if group_id])


def _chords(
    store: ResultStore,
    node: redis.Redis,
    batch: list[str],
    options: SweepOptions,
    summary: SweepSummary,
    repair: ChordRepair | None,
) -> None:
    if options.chords_only:
        summary.scanned += len(batch)
    for group_id in stalled_chords(store, node, batch):
        summary.chords_stalled += 1
        if options.dry_run:
            summary.planned_total += 1
            if len(summary.planned) < PLAN_LIMIT:
                summary.planned.append(("repair", store.layout.chord_keys(group_id).claim))
            continue
        if repair is None:
            continue
        outcome = repair(group_id)
        if outcome == "repaired":
            summary.chords_repaired += 1
        elif outcome == "settled":
            summary.chords_settled += 1
        elif outcome == "failed":
            summary.chords_failed += 1
