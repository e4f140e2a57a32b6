"""Key metrics: what is in the keyspace, and optional Prometheus export.

``stats()`` counts our keys by kind, histograms their remaining TTLs, finds keys with no
TTL and the oldest of them, and weighs a sample with MEMORY USAGE. On a large keyspace it
samples: it examines the first ``sample_limit`` keys SCAN returns (hash order, so close
to random) and scales the counts up, and says so.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from . import keys
from .sweep import SweepSummary, batch_script_keys, primaries, scan_keys, slot_groups

if TYPE_CHECKING:
    from .backend import PerkeyBackend

__all__ = ["TTL_BUCKETS", "KeyStats", "collect_stats", "export_prometheus", "serve_prometheus"]

#: Upper bounds (seconds) of the remaining-TTL histogram; the last bucket is open.
TTL_BUCKETS: tuple[tuple[str, float], ...] = (
    ("<1m", 60.0),
    ("<1h", 3600.0),
    ("<1d", 86400.0),
    ("<7d", 604800.0),
    (">=7d", float("inf")),
)


@dataclass
class KeyStats:
    """A picture of the keyspace. Counts are estimates when ``sampled`` is true."""

    by_kind: dict[str, int] = field(default_factory=dict)
    ttl_histogram: dict[str, int] = field(default_factory=dict)
    no_ttl: int = 0
    oldest_no_ttl_age: float | None = None
    unexpected_type: int = 0
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
    backend: PerkeyBackend, sample_limit: int = 100_000, memory_samples: int = 200
) -> KeyStats:
    """Measure the backend's keys.

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
    client = backend.client
    layout = backend.layout
    bounds = [str(int(bound * 1000)) for _, bound in TTL_BUCKETS[:-1]]
    stats = KeyStats()
    kinds: Counter[str] = Counter()
    buckets = [0] * len(TTL_BUCKETS)
    oldest_ms = -1
    weights: list[int] = []
    with backend._errors("stats", None):
        nodes = primaries(client)
        stats.db_keys = sum(int(node.dbsize()) for node in nodes)
        stats.used_memory = sum(int(node.info("memory")["used_memory"]) for node in nodes)
        now_ms = int(client.time()[0]) * 1000
        stats.sampled = stats.db_keys > sample_limit
        # When sampling, look at every key (no MATCH) so the share of ours is known.
        pattern = "*" if stats.sampled else layout.match_all
        for node, page in scan_keys(client, pattern, 1000):
            page = page[: max(0, sample_limit - stats.examined)]
            stats.examined += len(page)
            ours = [k for k in page if k.startswith(layout.prefix)]
            groups = slot_groups(client, ours)

            def build(pipe: Any, ours: list[str] = ours, groups: list[list[int]] = groups) -> None:
                for group in groups:
                    flat = batch_script_keys(layout, ours, group)
                    backend.queue_script(
                        pipe, keys.STATS_BATCH, flat, [layout.prefix, len(group), *bounds]
                    )
                for key in ours[: max(0, memory_samples - len(weights))]:
                    pipe.memory_usage(key)

            replies = backend.pipelined(build, "stats", on=node)
            for seen, counts, no_ttl, oldest, unexpected in replies[: len(groups)]:
                for pair in seen:
                    code, _, count = pair.decode().partition("=")
                    kinds[keys.KIND_NAMES[code]] += int(count)
                buckets = [a + int(b) for a, b in zip(buckets, counts, strict=True)]
                stats.no_ttl += int(no_ttl)
                stats.unexpected_type += int(unexpected)
                if int(oldest) >= 0 and (oldest_ms < 0 or int(oldest) < oldest_ms):
                    oldest_ms = int(oldest)
            weights.extend(int(size) for size in replies[len(groups) :] if size)
            if stats.examined >= sample_limit:
                break
    scale = stats.db_keys / stats.examined if stats.sampled and stats.examined else 1.0
    stats.by_kind = {kind: round(n * scale) for kind, n in sorted(kinds.items())}
    stats.ttl_histogram = {
        name: round(count * scale) for (name, _), count in zip(TTL_BUCKETS, buckets, strict=True)
    }
    stats.no_ttl = round(stats.no_ttl * scale)
    stats.unexpected_type = round(stats.unexpected_type * scale)
    stats.our_keys = sum(stats.by_kind.values())
    stats.oldest_no_ttl_age = max(0.0, (now_ms - oldest_ms) / 1000) if oldest_ms >= 0 else None
    stats.bytes_per_key = sum(weights) / len(weights) if weights else None
    stats.duration = time.monotonic() - started
    return stats


def export_prometheus(
    stats: KeyStats | None = None,
    summary: SweepSummary | None = None,
    registry: Any = None,
    textfile: str | None = None,
) -> Any:
    """Publish ``stats`` as gauges and ``summary`` as counters (``pip install .[prometheus]``).

    Parameters
    ----------
    registry:
        A ``prometheus_client.CollectorRegistry``; the default registry when omitted,
        which a worker serving ``prometheus_client.start_http_server`` exposes.
    textfile:
        Also write the registry to this path for node-exporter's textfile collector.

    Returns
    -------
    The registry written to.
    """
    import prometheus_client as prom

    registry = registry if registry is not None else prom.REGISTRY
    metrics = _metrics(registry)
    if stats is not None:
        for kind, count in stats.by_kind.items():
            metrics["keys"].labels(kind=kind).set(count)
        for bucket, count in stats.ttl_histogram.items():
            metrics["ttl"].labels(remaining=bucket).set(count)
        metrics["no_ttl"].set(stats.no_ttl)
        metrics["oldest"].set(stats.oldest_no_ttl_age or 0)
        metrics["bytes"].set(stats.bytes_per_key or 0)
        metrics["db_keys"].set(stats.db_keys)
        metrics["memory"].set(stats.used_memory)
    if summary is not None and not summary.dry_run:
        metrics["sweeps"].inc()
        for cls, count in summary.by_class.items():
            metrics["swept"].labels(**{"class": cls}).inc(count)
        metrics["ttl_set"].inc(summary.ttl_set)
        metrics["unlinked"].inc(summary.unlinked)
    if textfile:
        prom.write_to_textfile(textfile, registry)
    return registry


_registered: dict[int, dict[str, Any]] = {}
_serving: set[int] = set()


def serve_prometheus(port: int) -> None:
    """Serve the default registry on ``port`` from this process, once."""
    if port in _serving:
        return
    import prometheus_client as prom

    prom.start_http_server(port)
    _serving.add(port)


def _metrics(registry: Any) -> dict[str, Any]:
    found = _registered.get(id(registry))
    if found is not None:
        return found
    from prometheus_client import Counter as PCounter
    from prometheus_client import Gauge

    def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
        return Gauge(f"perkey_{name}", doc, labels, registry=registry)

    def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
        return PCounter(f"perkey_{name}", doc, labels, registry=registry)

    found = {
        "keys": gauge("keys", "Result backend keys by kind", ("kind",)),
        "ttl": gauge("keys_ttl_remaining", "Keys by remaining TTL", ("remaining",)),
        "no_ttl": gauge("keys_without_ttl", "Keys of ours with no TTL"),
        "oldest": gauge("oldest_key_without_ttl_seconds", "Age of the oldest TTL-less key"),
        "bytes": gauge("key_bytes", "Sampled MEMORY USAGE per key"),
        "db_keys": gauge("db_keys", "All keys in the database"),
        "memory": gauge("used_memory_bytes", "The server's used_memory"),
        "sweeps": counter("sweeps", "Sweeps run"),
        "swept": counter("swept_keys", "Keys seen by sweeps, by class", ("class",)),
        "ttl_set": counter("sweep_ttl_set", "TTLs set by sweeps"),
        "unlinked": counter("sweep_unlinked", "Keys unlinked by sweeps"),
    }
    _registered[id(registry)] = found
    return found
