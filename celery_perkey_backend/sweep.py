"""The sweep: find the keys of ours that slipped through, and fix them gently.

Every entry point (``backend.cleanup()``, the ``celery_perkey_backend.sweep`` task, the
``celery perkey sweep`` command) runs :func:`sweep`. It walks only our own keys (SCAN
with an escaped MATCH on the prefix), under a lock that keeps two sweeps from
overlapping, in batches with optional pauses, and acts only through scripts that check
again, atomically, that the action is still right for the key.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import redis

from . import keys
from .errors import ConfigurationError

if TYPE_CHECKING:
    from .backend import PerkeyBackend

__all__ = ["CLASSES", "SweepOptions", "SweepSummary", "scan_keys", "sweep"]

logger = logging.getLogger(__name__)

#: Every class a key can fall in, in report order.
CLASSES = ("healthy", "no_ttl", "too_old", "leftover", "unexpected")

#: How many planned actions a dry run lists (the counts are always complete).
PLAN_LIMIT = 1000


@dataclass
class SweepOptions:
    """How a sweep behaves; ``backend.sweep_options()`` fills it from the settings.

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
        SCAN's COUNT hint.
    batch_size:
        Keys inspected (and fixed) per pipelined round trip.
    pause:
        Seconds to sleep between batches, to keep other clients' latency flat.
    lock_ttl:
        Seconds the sweep lock lives without renewal; a crashed sweeper's lock expires.
    memory_samples:
        How many removed keys are weighed with MEMORY USAGE to estimate bytes reclaimed.
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
    planned: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """The one-line summary the sweep logs."""
        if self.skipped_locked:
            return "perkey sweep: skipped, another sweep holds the lock"
        classes = " ".join(f"{name}={self.by_class[name]}" for name in CLASSES)
        verb = "would set" if self.dry_run else "set"
        gone = "would unlink" if self.dry_run else "unlinked"
        return (
            f"perkey sweep: scanned={self.scanned} {classes} ttl {verb}={self.ttl_set} "
            f"{gone}={self.unlinked} reclaimed~{self.bytes_reclaimed}B "
            f"in {self.duration:.3f}s" + (" (dry run)" if self.dry_run else "")
        )


def sweep(
    backend: PerkeyBackend,
    progress: Callable[[int, int], None] | None = None,
    **overrides: Any,
) -> SweepSummary:
    """Run one sweep over ``backend``'s keys.

    Parameters
    ----------
    backend:
        The perkey backend whose keys (prefix, server) are swept.
    progress:
        Called after each batch with ``(keys scanned, keys in the database)``.
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
    """
    options = backend.sweep_options(**overrides)
    summary = SweepSummary(dry_run=options.dry_run)
    started = time.monotonic()
    client = backend.client
    layout = backend.layout
    token = uuid.uuid4().hex
    lock_ms = max(1, int(options.lock_ttl * 1000))
    with backend._errors("sweep", layout.sweep_lock):
        if not client.set(layout.sweep_lock, token, nx=True, px=lock_ms):
            summary.skipped_locked = True
            logger.info(summary.line())
            return summary
        try:
            _run(backend, client, options, summary, progress, token, lock_ms)
        finally:
            backend._script(keys.LOCK_RELEASE)(keys=[layout.sweep_lock], args=[token])
    summary.duration = time.monotonic() - started
    logger.info(summary.line())
    return summary


def _server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def primaries(client: redis.Redis) -> list[redis.Redis]:
    """A client per primary: the server itself, or every primary of a cluster."""
    if isinstance(client, redis.RedisCluster):
        return [client.get_redis_connection(node) for node in client.get_primaries()]
    return [client]


def scan_keys(
    client: redis.Redis, pattern: str, count: int
) -> Iterator[tuple[redis.Redis, list[str]]]:
    """Pages of keys matching ``pattern``, with the primary that holds them, decoded.

    SCAN may repeat a key. Each page comes from one server, so the scripts that look at
    it can be pipelined to that server (a cluster pipeline refuses scripts).
    """
    for node in primaries(client):
        cursor = 0
        while True:
            cursor, page = node.scan(cursor, match=pattern, count=count)
            if page:
                yield node, [_text(k) for k in page]
            if cursor == 0:
                break


def _text(key: bytes | str) -> str:
    return key if isinstance(key, str) else key.decode("utf-8", "surrogateescape")


def slot_groups(client: redis.Redis, names: list[str]) -> list[list[int]]:
    """Indexes of ``names`` grouped so that each group's keys can share one script.

    A single server takes them all at once; a cluster needs one group per slot.
    """
    if not isinstance(client, redis.RedisCluster):
        return [list(range(len(names)))]
    from redis.crc import key_slot

    groups: dict[int, list[int]] = {}
    for index, name in enumerate(names):
        groups.setdefault(key_slot(name.encode("utf-8", "surrogateescape")), []).append(index)
    return list(groups.values())


def batch_script_keys(layout: keys.KeyLayout, names: list[str], group: list[int]) -> list[str]:
    """KEYS for one sweep or stats script call: the keys, then their chords' size keys."""
    batch = [names[index] for index in group]
    chord_prefix = layout.prefix + "c:"
    sizes = {name[:-1] + "s" for name in batch if name.startswith(chord_prefix)}
    return batch + sorted(sizes)


def _run(
    backend: PerkeyBackend,
    client: redis.Redis,
    options: SweepOptions,
    summary: SweepSummary,
    progress: Callable[[int, int], None] | None,
    token: str,
    lock_ms: int,
) -> None:
    layout = backend.layout
    start_ms = _server_ms(client)
    # Only keys last written before both the sweep's start and max_age ago may go.
    cutoff_ms = start_ms - int(options.max_age * 1000)
    total = sum(int(node.dbsize()) for node in primaries(client))
    ttl_ms = max(1, int(options.ttl * 1000))
    weighed = [0, 0]  # bytes, keys weighed with MEMORY USAGE before unlinking
    renew = backend._script(keys.LOCK_RENEW)
    first = True
    for node, chunk in _chunks(scan_keys(client, layout.match_all, options.scan_count), options):
        if not first:
            if options.pause:
                time.sleep(options.pause)
            if not renew(keys=[layout.sweep_lock], args=[token, lock_ms]):
                logger.warning("perkey sweep: lost its lock, stopping early")
                return
        first = False
        _batch(backend, node, chunk, options, summary, cutoff_ms, ttl_ms, weighed)
        if progress:
            progress(summary.scanned, total)
    if weighed[1]:
        summary.bytes_reclaimed = int(weighed[0] / weighed[1] * summary.unlinked)


def _chunks(
    pages: Iterator[tuple[redis.Redis, list[str]]], options: SweepOptions
) -> Iterator[tuple[redis.Redis, list[str]]]:
    """Batches of ``batch_size`` keys, each from one server."""
    pending: list[str] = []
    current: redis.Redis | None = None
    for node, page in pages:
        if current is not None and node is not current and pending:
            yield current, pending
            pending = []
        current = node
        pending.extend(page)
        while len(pending) >= options.batch_size:
            yield node, pending[: options.batch_size]
            pending = pending[options.batch_size :]
    if current is not None and pending:
        yield current, pending


def _batch(
    backend: PerkeyBackend,
    client: redis.Redis,
    batch: list[str],
    options: SweepOptions,
    summary: SweepSummary,
    cutoff_ms: int,
    ttl_ms: int,
    weighed: list[int],
) -> None:
    groups = slot_groups(backend.client, batch)
    head = [
        "0" if options.dry_run else "1",
        "1" if options.delete else "0",
        ttl_ms,
        cutoff_ms,
        max(0, options.memory_samples - weighed[1]),
        backend.layout.prefix,
    ]

    def build(pipe: Any) -> None:
        for group in groups:
            flat = batch_script_keys(backend.layout, batch, group)
            backend.queue_script(pipe, keys.SWEEP_BATCH, flat, [*head, len(group)])

    replies = backend.pipelined(build, "sweep", on=client)
    for group, (classes, actions, size, count) in zip(groups, replies, strict=True):
        classes, actions = classes.decode(), actions.decode()
        weighed[0] += int(size)
        weighed[1] += int(count)
        for letter, name in keys.CLASS_LETTERS.items():
            summary.by_class[name] += classes.count(letter)
        summary.scanned += len(classes) - classes.count("-")
        summary.ttl_set += actions.count("t")
        summary.unlinked += actions.count("u")
        if options.dry_run:
            for index, action in zip(group, actions, strict=True):
                if action != "." and len(summary.planned) < PLAN_LIMIT:
                    summary.planned.append(("ttl" if action == "t" else "unlink", batch[index]))


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(value: Any, name: str = "duration") -> float:
    """Seconds from a number, a ``timedelta`` or text such as ``"90s"``, ``"2h"``, ``"1d"``.

    Raises
    ------
    ConfigurationError
        If ``value`` is none of those, or negative.
    """
    seconds: float | None = None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        unit = _UNITS.get(text[-1:]) if text else None
        number = text[:-1] if unit else text
        try:
            seconds = float(number) * (unit or 1.0)
        except ValueError:
            seconds = None
    if seconds is None or seconds < 0:
        raise ConfigurationError(
            f"{name}={value!r} is not a duration; use seconds or text like 90s, 30m, 2h, 1d"
        )
    return seconds
