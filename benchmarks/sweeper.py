"""Figure 9: the sweeper (``celery_perkey_backend.sweep``).

* Scan rate: one sweep (``dry_run=False, delete=False``) over a keyspace of N result
  keys that all have a TTL, so it only reads; ``scanned / duration``.
* Other clients' latency: the helper process PINGs in a loop during that sweep, and
  again for as long with no sweep running; p99 of each.
* Orphans: N results stored with ``result_expires = None`` (no TTL) in an otherwise
  empty db; the time one sweep takes to give them a TTL, and separately, with
  ``delete=True, max_age=0``, to unlink them.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .common import DB_ORPHANS, DB_SWEEP, BackendSpec, close_app, make_app, new_id, store_one
from .context import Bench

#: Creates result keys in bulk, in the exact form the store script writes them:
#: ARGV: key prefix, element before the id, element after it, first number, count, TTL ms.
POPULATE = """
local prefix, head, tail = ARGV[1], ARGV[2], ARGV[3]
local first, count, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
for i = first, first + count - 1 do
  local id = string.format('%08x-0000-4000-8000-%012x', i, i)
  local key = prefix .. 'r:{' .. id .. '}'
  redis.call('RPUSH', key, head .. id .. tail)
  if ttl > 0 then
    redis.call('PEXPIRE', key, ttl)
  end
end
return count
"""

CHUNK = 20_000


def load_sweep() -> Callable[..., Any] | None:
    try:
        module = importlib.import_module("celery_perkey_backend.sweep")
    except ImportError:
        return None
    return getattr(module, "sweep", None)


def _spec_on(spec: BackendSpec, db: int) -> BackendSpec:
    return replace(spec, url=spec.url.rsplit("/", 1)[0] + f"/{db}", redis_db=db)


def populate(bench: Bench, spec: BackendSpec, n: int) -> None:
    """``n`` result keys with a one-day TTL in ``spec``'s db, built from a real one."""
    app = make_app(spec)
    try:
        client = bench.client(spec.redis_db or 0)
        client.flushdb()
        sample_id = new_id()
        store_one(app, spec, sample_id)
        key = app.backend.layout.result(sample_id)
        element = client.lindex(key, 0)
        client.delete(key)
        if element is None or element.count(sample_id.encode()) != 1:
            raise RuntimeError("cannot build result keys from the stored sample")
        head, tail = element.split(sample_id.encode())
        prefix = app.backend.layout.prefix
        script = client.register_script(POPULATE)
        for first in range(0, n, CHUNK):
            script(args=[prefix, head, tail, first, min(CHUNK, n - first), 86_400_000])
        if client.dbsize() != n:
            raise RuntimeError(f"populated {client.dbsize()} keys, wanted {n}")
    finally:
        close_app(app)


def _orphans(bench: Bench, spec: BackendSpec, n: int) -> None:
    app = make_app(spec, result_expires=None)
    try:
        client = bench.client(spec.redis_db or 0)
        client.flushdb()
        last = ""
        for _ in range(n):
            last = new_id()
            store_one(app, spec, last)
        if client.pttl(app.backend.layout.result(last)) != -1:
            raise RuntimeError("result_expires=None still gave the orphans a TTL")
    finally:
        close_app(app)


def _timed_sweep(sweep: Callable[..., Any], spec: BackendSpec, **kwargs: Any) -> tuple[Any, float]:
    """One sweep on a connected backend; its summary and the wall time in ns."""
    app = make_app(spec)
    try:
        app.backend.client.ping()  # connect before the clock starts
        start = time.perf_counter_ns()
        summary = sweep(app.backend, **kwargs)
        return summary, float(time.perf_counter_ns() - start)
    finally:
        close_app(app)


def run_sweep(bench: Bench) -> None:
    sweep = load_sweep()
    if sweep is None:
        bench.results.unavailable["sweep"] = (
            "not available: celery_perkey_backend.sweep is not importable in this tree"
        )
        return
    base = bench.spec("perkey") if bench.has("perkey") else None
    if base is None:
        bench.results.unavailable["sweep"] = "not run: the perkey backend is not selected"
        return
    keyspace = _spec_on(base, DB_SWEEP)
    orphans = _spec_on(base, DB_ORPHANS)
    n_keys, n_orphans = bench.sizes.sweep_keys, bench.sizes.orphans
    bench.results.meta["sweep_sizes"] = {"keys": n_keys, "orphans": n_orphans}
    populate(bench, keyspace, n_keys)
    try:
        for _ in bench.round_range("sweep", heavy=True):
            # B: a sweep, with the helper measuring PING latency meanwhile.
            bench.helper.stop_event.clear()
            bench.helper.send("probe", limit=600.0)
            try:
                summary, wall = _timed_sweep(
                    sweep, keyspace, dry_run=False, delete=False, max_age=None
                )
            finally:
                bench.helper.stop_event.set()
                during = bench.helper.receive(60)
            duration = float(getattr(summary, "duration", 0.0)) or wall / 1e9
            bench.results.add("sweep_scan_rate", "perkey", summary.scanned / duration)
            bench.results.add("sweep_scan_wall", "perkey", wall)
            bench.results.add("sweep_probe_p99_during", "perkey", during["p99"])
            bench.results.add("sweep_probe_p50_during", "perkey", during["p50"])
            if summary.scanned < n_keys:
                bench.results.note(f"sweep: scanned {summary.scanned} of {n_keys} keys.")
            # A: the same probe for as long, with no sweep.
            bench.helper.stop_event.clear()
            bench.helper.send("probe", limit=wall / 1e9)
            idle = bench.helper.receive(wall / 1e9 + 60)
            bench.results.add("sweep_probe_p99_idle", "perkey", idle["p99"])
            bench.results.add("sweep_probe_p50_idle", "perkey", idle["p50"])
            # Orphans: give them a TTL, then (fresh ones) unlink them.
            _orphans(bench, orphans, n_orphans)
            summary, wall = _timed_sweep(sweep, orphans, dry_run=False, delete=False, max_age=None)
            bench.results.add("sweep_ttl_orphans", "perkey", wall)
            if summary.ttl_set != n_orphans:
                bench.results.note(
                    f"sweep: gave {summary.ttl_set} of {n_orphans} orphans a TTL "
                    f"(by class: {summary.by_class})."
                )
            _orphans(bench, orphans, n_orphans)
            summary, wall = _timed_sweep(sweep, orphans, dry_run=False, delete=True, max_age=0)
            bench.results.add("sweep_unlink_orphans", "perkey", wall)
            if summary.unlinked != n_orphans:
                bench.results.note(
                    f"sweep: unlinked {summary.unlinked} of {n_orphans} orphans "
                    f"(by class: {summary.by_class})."
                )
    finally:
        bench.helper.stop_event.clear()
        bench.client(DB_SWEEP).flushdb()
        bench.client(DB_ORPHANS).flushdb()
