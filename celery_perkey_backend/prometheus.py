"""Prometheus export of the key metrics and sweep counts (the ``prometheus`` extra).

The figures live in Redis, not in a process. Each sweep adds its counts to one hash
(``<prefix>metrics``) in one atomic script, and stores the key metrics it measured
after it; every process renders the same series from that hash, plus the servers' client
counts read at that moment. So a counter never goes backwards, whichever pool process
swept, however many there are, and whichever worker is scraped; and a gauge shows every
label each time (a kind whose keys are gone reads 0).

- **Port** (``perkey_prometheus_port``, on ``perkey_prometheus_addr``: all interfaces
  unless set): the main process of each ``celery worker`` serves the metrics from the
  moment it starts; its pool processes never listen. A
  second worker on the same host finds the port taken, says so once, and carries on: the
  process already listening serves the same figures.
- **Textfile** (``perkey_prometheus_textfile``): the sweeping process rewrites the file
  after each sweep, and the main process of each worker at start and every
  ``perkey_prometheus_refresh``; one write at a time (a lock file beside it), atomically
  (a rename), each from what Redis holds when it writes.

Only our own series are shown (a registry of our own, without the ``process_*`` and
``python_*`` collectors). If Redis cannot be read, only ``perkey_up 0`` is. The hash is
read leniently: a field that holds what no exporter writes is left out and named in one
warning, and the rest is shown. Recording never fails a sweep whose work is done.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import signals

from .errors import PerkeyError
from .keys import KIND_NAMES, LEGACY_KINDS
from .stats import TTL_BUCKETS, KeyStats, collect_stats
from .store import ResultStore
from .sweep import CLASSES, ChordRepair, SweepSummary, sweep
from .tasks import uses_perkey

__all__ = [
    "METRIC_NAMES",
    "exporting",
    "record_stats",
    "render",
    "serve",
    "sweep_and_publish",
    "write_textfile",
]

logger = logging.getLogger("celery_perkey_backend")

#: What a sweep can do with a stalled chord (``SweepSummary.chords_<outcome>``).
CHORD_OUTCOMES = ("repaired", "settled", "failed")

#: Every sample name the exporter can write (counters with their ``_total``).
METRIC_NAMES = frozenset(
    {
        "perkey_up",
        "perkey_keys",
        "perkey_keys_ttl_remaining",
        "perkey_keys_without_ttl",
        "perkey_oldest_key_without_ttl_seconds",
        "perkey_unexpected_keys",
        "perkey_key_bytes",
        "perkey_db_keys",
        "perkey_used_memory_bytes",
        "perkey_legacy_keys",
        "perkey_legacy_keys_without_ttl",
        "perkey_stats_timestamp_seconds",
        "perkey_sweeps_total",
        "perkey_swept_keys_total",
        "perkey_sweep_ttl_set_total",
        "perkey_sweep_unlinked_total",
        "perkey_sweep_failures_total",
        "perkey_sweep_chords_total",
        "perkey_chords_stalled",
        "perkey_last_sweep_timestamp_seconds",
        "perkey_last_sweep_duration_seconds",
        "perkey_server_connected_clients",
        "perkey_server_blocked_clients",
        "perkey_server_maxclients",
    }
)


def exporting(store: ResultStore) -> bool:
    """Whether the store's settings ask for Prometheus export."""
    settings = store.settings
    return bool(settings.prometheus_port or settings.prometheus_textfile)


# -- recording, in the process that sweeps ------------------------------------------


def sweep_and_publish(
    store: ResultStore,
    progress: Callable[[int, int], None] | None = None,
    repair: ChordRepair | None = None,
    **options: Any,
) -> SweepSummary:
    """Sweep (``repair`` publishes stalled chords' bodies); with export configured, count
    it (or its failure) and the key metrics.

    Every sweep entry point runs this: ``backend.cleanup()``, the sweep task, the CLI.
    """
    try:
        summary = sweep(store, progress=progress, repair=repair, **options)
    except PerkeyError:
        if exporting(store):
            _quietly(lambda: store.record_metrics([("+", "sweep_failures", 1)]), "a failure")
        raise
    if exporting(store) and not summary.skipped_locked and not summary.dry_run:
        # The sweep's work is done: nothing here may make it fail.
        try:
            _record_sweep(store, summary)
        except (PerkeyError, OSError, ValueError) as exc:
            logger.warning("perkey: the sweep is done, but not recorded for Prometheus: %s", exc)
    return summary


def _record_sweep(store: ResultStore, summary: SweepSummary) -> None:
    changes: list[tuple[str, str, int | str]] = [
        ("+", "sweeps", 1),
        ("+", "ttl_set", summary.ttl_set),
        ("+", "unlinked", summary.unlinked),
        ("=", "last_sweep_ms", store.server_time_ms()),
        ("=", "last_sweep_duration_ms", round(summary.duration * 1000)),
    ]
    changes += [("+", f"swept:{cls}", n) for cls, n in summary.by_class.items()]
    changes += [
        ("+", f"chords:{outcome}", getattr(summary, f"chords_{outcome}"))
        for outcome in CHORD_OUTCOMES
    ]
    _report_repaired(store, store.record_metrics(changes))
    record_stats(store)
    if store.settings.prometheus_textfile:
        write_textfile(store, store.settings.prometheus_textfile)


def record_stats(store: ResultStore, stats: KeyStats | None = None) -> None:
    """Store the key metrics (measured now unless given) for every exporter to show."""
    measured_ms = store.server_time_ms()
    stats = stats if stats is not None else collect_stats(store)
    payload = json.dumps(stats.as_dict()).encode()
    _report_repaired(store, store.record_metrics([], stats=payload, stats_ms=measured_ms))


def _report_repaired(store: ResultStore, fields: list[str]) -> None:
    if fields:
        logger.warning(
            "perkey: the metrics hash %r held no number in field(s) %s; set anew",
            store.layout.metrics,
            ", ".join(repr(name) for name in fields),
        )


def _quietly(action: Callable[[], Any], what: str) -> None:
    try:
        action()
    except PerkeyError as exc:
        logger.warning("perkey: could not record %s for Prometheus: %s", what, exc)


# -- rendering, in any process --------------------------------------------------------


class _Collector:
    """prometheus_client's collector protocol, over the metrics hash in Redis."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            fields = self.store.read_metrics()
            clients = self.store.server_clients()
        except PerkeyError as exc:
            logger.warning("perkey: Prometheus figures unavailable: %s", exc)
            yield GaugeMetricFamily("perkey_up", "1 if Redis answered", value=0)
            return
        yield GaugeMetricFamily("perkey_up", "1 if Redis answered", value=1)
        numbers, stats = _parsed(self.store.layout.metrics, fields)
        yield from _sweep_families(numbers)
        if stats is not None and "stats_ms" in numbers:
            yield from _stats_families(stats, numbers["stats_ms"])
        yield from _client_families(clients)


def _parsed(where: str, fields: dict[str, bytes]) -> tuple[dict[str, int], dict[str, Any] | None]:
    """The metrics hash read leniently: its counters and times, and the key metrics
    (``None`` if there are none), with a default for any figure a writer did not store
    (another version of this package). A field that cannot be read is left out, and
    named in one warning: one junk field never hides the others."""
    bad: list[str] = []
    numbers: dict[str, int] = {}
    for name, raw in fields.items():
        if name == "stats":
            continue
        try:
            numbers[name] = int(raw)
        except ValueError:
            bad.append(name)
    stats = None
    if "stats" in fields:
        stats, wrong = _snapshot(fields["stats"])
        bad += wrong
    if bad:
        logger.warning(
            "perkey: ignored what the metrics hash %r holds in field(s) %s: not what "
            "the exporter writes",
            where,
            ", ".join(repr(name) for name in bad),
        )
    return numbers, stats


def _snapshot(raw: bytes) -> tuple[dict[str, Any] | None, list[str]]:
    """The stored key metrics, each figure of the type :class:`KeyStats` gives it (a
    default where not), and the names of the figures that were not."""
    try:
        stored = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, ["stats"]
    if not isinstance(stored, dict):
        return None, ["stats"]
    snapshot, wrong = {}, []
    for name, default in KeyStats().as_dict().items():
        value = stored.get(name, default)
        if not _like(value, default):
            wrong.append(f"stats.{name}")
            value = default
        snapshot[name] = value
    return snapshot, wrong


def _like(value: Any, default: Any) -> bool:
    """Whether a stored figure has the shape of its default: a number (or ``None``
    where the default is), a mapping of names to numbers, a list of names."""
    if isinstance(default, dict):
        return isinstance(value, dict) and all(_number(v) for v in value.values())
    if isinstance(default, list):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if isinstance(default, bool):
        return isinstance(value, bool)
    return _number(value) or (value is None and default is None)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _sweep_families(fields: dict[str, int]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def number(name: str) -> int:
        return fields.get(name, 0)

    for name, field, doc in (
        ("perkey_sweeps", "sweeps", "Sweeps run (dry runs and skipped ones aside)"),
        ("perkey_sweep_ttl_set", "ttl_set", "TTLs set by sweeps"),
        ("perkey_sweep_unlinked", "unlinked", "Keys unlinked by sweeps"),
        ("perkey_sweep_failures", "sweep_failures", "Sweeps that raised an error"),
    ):
        yield CounterMetricFamily(name, doc, value=number(field))
    swept = CounterMetricFamily(
        "perkey_swept_keys", "Keys seen by sweeps, by class", labels=["class"]
    )
    for cls in CLASSES:
        swept.add_metric([cls], number(f"swept:{cls}"))
    yield swept
    chords = CounterMetricFamily(
        "perkey_sweep_chords", "Stalled chords handled by sweeps, by outcome", labels=["outcome"]
    )
    for outcome in CHORD_OUTCOMES:
        chords.add_metric([outcome], number(f"chords:{outcome}"))
    yield chords
    if "last_sweep_ms" in fields:
        yield GaugeMetricFamily(
            "perkey_last_sweep_timestamp_seconds",
            "When the last sweep ended (server clock)",
            value=number("last_sweep_ms") / 1000,
        )
        yield GaugeMetricFamily(
            "perkey_last_sweep_duration_seconds",
            "How long the last sweep took",
            value=number("last_sweep_duration_ms") / 1000,
        )


def _stats_families(stats: dict[str, Any], measured_ms: int) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    def labelled(name: str, doc: str, label: str, values: dict[str, int], names: Any) -> Any:
        family = GaugeMetricFamily(name, doc, labels=[label])
        for key in names:
            family.add_metric([key], values.get(key, 0))
        return family

    kinds = sorted(set(KIND_NAMES.values()))
    yield labelled("perkey_keys", "Result backend keys by kind", "kind", stats["by_kind"], kinds)
    yield labelled(
        "perkey_keys_ttl_remaining",
        "Keys by remaining TTL",
        "remaining",
        stats["ttl_histogram"],
        [name for name, _ in TTL_BUCKETS],
    )
    for name, doc, value in (
        ("perkey_keys_without_ttl", "Keys of ours with no TTL (the sweep fixes them)",
         stats["no_ttl"]),
        ("perkey_oldest_key_without_ttl_seconds", "Age of the oldest TTL-less key",
         stats["oldest_no_ttl_age"] or 0),
        ("perkey_unexpected_keys", "Keys under our prefix of a type we never write",
         stats["unexpected_type"]),
        ("perkey_chords_stalled", "Chords complete but never published, past deadline",
         stats["chords_stalled"]),
        ("perkey_key_bytes", "Sampled MEMORY USAGE per key", stats["bytes_per_key"] or 0),
        ("perkey_db_keys", "All keys in the database", stats["db_keys"]),
        ("perkey_used_memory_bytes", "The servers' used_memory", stats["used_memory"]),
        ("perkey_stats_timestamp_seconds", "When these key metrics were measured",
         measured_ms / 1000),
    ):  # fmt: skip
        yield GaugeMetricFamily(name, doc, value=value)
    yield labelled(
        "perkey_legacy_keys",
        "Keys redis:// left, by kind (during a switch)",
        "kind",
        stats["legacy_keys"],
        LEGACY_KINDS,
    )
    yield labelled(
        "perkey_legacy_keys_without_ttl",
        "Keys redis:// left without a TTL, by kind",
        "kind",
        stats["legacy_without_ttl"],
        LEGACY_KINDS,
    )


def _client_families(clients: list[tuple[str, dict[str, int]]]) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    for name, field, doc in (
        ("perkey_server_connected_clients", "connected_clients", "Clients connected now"),
        ("perkey_server_blocked_clients", "blocked_clients", "Clients blocked now (waiters)"),
        ("perkey_server_maxclients", "maxclients", "The server's maxclients"),
    ):
        family = GaugeMetricFamily(name, doc, labels=["server"])
        for server, info in clients:
            if field in info:
                family.add_metric([server], info[field])
        yield family


def _registry(store: ResultStore) -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(store))
    return registry


def render(store: ResultStore) -> bytes:
    """The metrics in Prometheus' text format, as a scrape would see them now."""
    from prometheus_client import generate_latest

    data: bytes = generate_latest(_registry(store))
    return data


def write_textfile(store: ResultStore, path: str) -> None:
    """Write the metrics to ``path`` for node-exporter's textfile collector.

    One writer at a time (a lock file beside it), each rendering what Redis holds once it
    has the lock, so a slower writer can never put older counts back; the file is
    replaced atomically.
    """
    from prometheus_client import write_to_textfile

    with _locked(path + ".lock"):
        write_to_textfile(path, _registry(store))


@contextmanager
def _locked(path: str) -> Iterator[None]:
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_serving: dict[tuple[str, int], Any] = {}


def serve(store: ResultStore, port: int, addr: str | None = None) -> bool:
    """Serve the metrics on ``addr:port`` from this process (once); False if it cannot.

    ``addr`` defaults to ``perkey_prometheus_addr`` (all interfaces unless set). A taken
    port is no error: another process of this host serves the same figures. An address
    this host cannot listen on is logged as the error it is.
    """
    addr = store.settings.prometheus_addr if addr is None else addr
    if (addr, port) in _serving:
        return True
    from prometheus_client import start_http_server

    try:
        _serving[addr, port] = start_http_server(port, addr=addr, registry=_registry(store))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            logger.warning(
                "perkey: Prometheus port %d is taken (%s); the process listening there "
                "serves the same figures, which live in Redis",
                port,
                exc,
            )
        else:
            logger.error(
                "perkey: cannot serve Prometheus metrics on %s port %d (%s); check "
                "perkey_prometheus_addr, an address of this host",
                addr,
                port,
                exc,
            )
        return False
    return True


# -- the worker's main process ------------------------------------------------------


def _start(store: ResultStore, stop: threading.Event) -> None:
    """Serve or write from the worker's main process, for as long as it runs."""
    settings = store.settings
    if settings.prometheus_port:
        serve(store, settings.prometheus_port)

    def run() -> None:
        # Key metrics from the start, not from the first sweep (04:00 by default).
        if "stats" not in _safe_read(store):
            _quietly(lambda: record_stats(store), "the key metrics")
        while settings.prometheus_textfile:
            _quietly(lambda: write_textfile(store, str(settings.prometheus_textfile)), "a file")
            if stop.wait(settings.prometheus_refresh_s):
                return

    threading.Thread(target=run, name="perkey-prometheus", daemon=True).start()


def _safe_read(store: ResultStore) -> dict[str, bytes]:
    try:
        return store.read_metrics()
    except PerkeyError:
        return {}


_stops: list[threading.Event] = []


@signals.worker_init.connect(weak=False)  # type: ignore[untyped-decorator]
def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None or not uses_perkey(app):
        return
    store = app.backend.store
    if exporting(store):
        stop = threading.Event()
        _stops.append(stop)
        _start(store, stop)


@signals.worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
def _on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    while _stops:
        _stops.pop().set()
