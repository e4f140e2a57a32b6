"""Prometheus export of the key metrics and sweep counts (the ``prometheus`` extra).

:func:`publish` is what every sweep entry point calls after a sweep when
``perkey_prometheus_port`` or ``perkey_prometheus_textfile`` is set.
"""

from __future__ import annotations

from typing import Any

from .stats import KeyStats, collect_stats
from .store import ResultStore
from .sweep import SweepSummary

__all__ = ["export_prometheus", "publish", "serve_prometheus"]


def publish(store: ResultStore, summary: SweepSummary) -> None:
    """After a sweep: serve or write the figures, as the store's settings ask."""
    settings = store.settings
    if summary.skipped_locked or not (settings.prometheus_port or settings.prometheus_textfile):
        return
    if settings.prometheus_port:
        serve_prometheus(settings.prometheus_port)
    export_prometheus(collect_stats(store), summary, textfile=settings.prometheus_textfile)


def export_prometheus(
    stats: KeyStats | None = None,
    summary: SweepSummary | None = None,
    registry: Any = None,
    textfile: str | None = None,
) -> Any:
    """Publish ``stats`` as gauges and ``summary`` as counters.

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
        metrics["stalled"].set(stats.chords_stalled)
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
        for outcome in ("repaired", "settled", "failed"):
            metrics["chords"].labels(outcome=outcome).inc(getattr(summary, f"chords_{outcome}"))
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
        "stalled": gauge("chords_stalled", "Chords complete but never published, past deadline"),
        "oldest": gauge("oldest_key_without_ttl_seconds", "Age of the oldest TTL-less key"),
        "bytes": gauge("key_bytes", "Sampled MEMORY USAGE per key"),
        "db_keys": gauge("db_keys", "All keys in the database"),
        "memory": gauge("used_memory_bytes", "The server's used_memory"),
        "sweeps": counter("sweeps", "Sweeps run"),
        "swept": counter("swept_keys", "Keys seen by sweeps, by class", ("class",)),
        "ttl_set": counter("sweep_ttl_set", "TTLs set by sweeps"),
        "unlinked": counter("sweep_unlinked", "Keys unlinked by sweeps"),
        "chords": counter(
            "sweep_chords", "Stalled chords handled by sweeps, by outcome", ("outcome",)
        ),
    }
    _registered[id(registry)] = found
    return found
