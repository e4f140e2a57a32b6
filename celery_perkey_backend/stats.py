"""Key metrics: what is in the keyspace.

:func:`collect_stats` counts our keys by kind, histograms their remaining TTLs, finds
keys with no TTL and the oldest of them, names keys of a type we never write, counts
stalled chords (complete, body never published, claim past its deadline: the sweep
repairs them), counts the keys Celery's ``redis://`` backend left (during a switch), and
weighs a sample with MEMORY USAGE. On a large keyspace it samples: it examines the first
``sample_limit`` keys SCAN returns (hash order, so close to random) and scales the counts
up, and says so.

Each key of ours is in exactly one of: a TTL bucket, ``no_ttl``, ``unexpected_type``.
``no_ttl`` is what the sweep gives a TTL (its classes no_ttl, and too_old or leftover
keys without one); keys of an unexpected type it never touches.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from . import scripts
from .keys import KIND_NAMES
from .legacy import LegacyCounts, count_legacy
from .store import ResultStore
from .sweep import HasStore, key_batches, stalled_chords, store_of

__all__ = ["TTL_BUCKETS", "UNEXPECTED_LISTED", "KeyStats", "collect_stats", "human_bytes"]

#: How many names of keys of an unexpected type ``stats()`` lists (all are counted).
UNEXPECTED_LISTED = 20

#: Upper bounds (seconds) of the remaining-TTL histogram; the last bucket is open.
TTL_BUCKETS: tuple[tuple[str, float], ...] = (
    ("<1m", 60.0),
    ("<1h", 3600.0),
    ("<1d", 86400.0),
    ("<7d", 604800.0),
    (">=7d", float("inf")),
)


def human_bytes(size: float) -> str:
    """``1536`` as ``1.5 KiB``: sizes an operator reads at a glance (``stats``, ``doctor``)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    step = 0
    while size >= 1024 and step < len(units) - 1:
        size /= 1024
        step += 1
    return f"{size:.0f} B" if step == 0 else f"{size:.1f} {units[step]}"


@dataclass
class KeyStats:
    """A picture of the keyspace. Counts are estimates when ``sampled`` is true."""

    by_kind: dict[str, int] = field(default_factory=dict)
    ttl_histogram: dict[str, int] = field(default_factory=dict)
    no_ttl: int = 0
    oldest_no_ttl_age: float | None = None
    unexpected_type: int = 0
    unexpected_keys: list[str] = field(default_factory=list)
    legacy_keys: dict[str, int] = field(default_factory=dict)
    legacy_without_ttl: dict[str, int] = field(default_factory=dict)
    chords_stalled: int = 0
    bytes_per_key: float | None = None
    our_keys: int = 0
    db_keys: int = 0
    used_memory: int = 0
    sampled: bool = False
    examined: int = 0
    duration: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect_stats(
    target: ResultStore | HasStore, sample_limit: int = 100_000, memory_samples: int = 200
) -> KeyStats:
    """Measure the keys of a store (or of the backend that carries it).

    Parameters
    ----------
    sample_limit:
        Examine at most this many keys; past it the figures are scaled estimates.
    memory_samples:
        How many of our keys to weigh with MEMORY USAGE.

    Raises
    ------
    BackendUnavailableError
        If the server cannot be reached.
    """
    started = time.monotonic()
    store = store_of(target)
    layout = store.layout
    bounds = [int(bound * 1000) for _, bound in TTL_BUCKETS[:-1]]
    stats = KeyStats()
    kinds: Counter[str] = Counter()
    buckets = [0] * len(TTL_BUCKETS)
    oldest_ms = -1
    weights: list[int] = []
    stats.db_keys = store.dbsize()
    stats.used_memory = store.used_memory()
    now_ms = store.server_time_ms()
    stats.sampled = stats.db_keys > sample_limit
    legacy = LegacyCounts()
    # Every key (no MATCH), for ours and the legacy ones in one walk; when sampling, so
    # that the share of ours is known too.
    for node, page in store.scan("*", 1000):
        page = page[: max(0, sample_limit - stats.examined)]
        stats.examined += len(page)
        count_legacy(store, node, page, legacy)
        ours = [k for k in page if k.startswith(layout.prefix)]
        batches = key_batches(store, ours)
        calls = [
            scripts.STATS_BATCH.bind(
                {"keys": part.keys[: len(part.indexes)]},
                {"count": len(part.indexes), "kinds": part.kinds, "bounds": bounds},
            )
            for part in batches
        ]
        weigh = ours[: max(0, memory_samples - len(weights))]
        replies, sizes = store.run_scripts(node, scripts.STATS_BATCH, calls, "stats", weigh)
        for part, (seen, counts, no_ttl, oldest, unexpected) in zip(batches, replies, strict=True):
            for pair in seen:
                code, _, count = pair.decode().partition("=")
                kinds[KIND_NAMES[code]] += int(count)
            buckets = [a + int(b) for a, b in zip(buckets, counts, strict=True)]
            stats.no_ttl += int(no_ttl)
            stats.unexpected_type += len(unexpected)
            room = UNEXPECTED_LISTED - len(stats.unexpected_keys)
            stats.unexpected_keys += [ours[part.indexes[int(n) - 1]] for n in unexpected[:room]]
            if int(oldest) >= 0 and (oldest_ms < 0 or int(oldest) < oldest_ms):
                oldest_ms = int(oldest)
        weights.extend(sizes)
        stats.chords_stalled += len(stalled_chords(store, node, ours))
        if stats.examined >= sample_limit:
            break
    scale = stats.db_keys / stats.examined if stats.sampled and stats.examined else 1.0
    stats.by_kind = {kind: round(n * scale) for kind, n in sorted(kinds.items())}
    stats.ttl_histogram = {
        name: round(count * scale) for (name, _), count in zip(TTL_BUCKETS, buckets, strict=True)
    }
    stats.no_ttl = round(stats.no_ttl * scale)
    stats.unexpected_type = round(stats.unexpected_type * scale)
    legacy = legacy.scaled(scale)
    stats.legacy_keys, stats.legacy_without_ttl = legacy.keys, legacy.without_ttl
    stats.chords_stalled = round(stats.chords_stalled * scale)
    stats.our_keys = sum(stats.by_kind.values())
    stats.oldest_no_ttl_age = max(0.0, (now_ms - oldest_ms) / 1000) if oldest_ms >= 0 else None
    stats.bytes_per_key = sum(weights) / len(weights) if weights else None
    stats.duration = time.monotonic() - started
    return stats
