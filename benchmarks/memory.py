"""Figure 7: server memory per stored result, on Redis 7.0 and on Valkey 8.

Each server is a fresh private one. Per backend and round: FLUSHALL, read INFO
``used_memory``, store N results through the backend's own ``store_result``, read it
again; the delta over N is the cost of one result, keyspace overhead included. MEMORY
USAGE (SAMPLES 0) of one key gives the key alone.
"""

from __future__ import annotations

import gc
from dataclasses import replace

import redis

from celery_perkey_backend.testing import find_server_binary, running_server

from .common import VALUE, BackendSpec, build_specs, close_app, make_app, new_id, store_one
from .context import Bench

#: (metric suffix, label, ``find_server_binary`` kind).
SERVERS = (
    ("redis7", "Redis 7.0 (system redis-server)", "system"),
    ("valkey8", "Valkey 8", "valkey"),
)


def _server_version(client: redis.Redis) -> str:
    info = client.info("server")
    if "valkey_version" in info:
        return f"Valkey {info['valkey_version']}"
    return f"Redis {info['redis_version']}"


def _key_of(app_backend: object, task_id: str) -> str:
    key = app_backend.get_key_for_task(task_id)  # type: ignore[attr-defined]
    return key.decode() if isinstance(key, bytes) else str(key)


def _measure(client: redis.Redis, spec: BackendSpec, n: int, tracked: bool) -> tuple[float, float]:
    """Bytes per task and MEMORY USAGE of one task's key: its ready result, or with
    ``tracked`` its intermediate state while it runs (STARTED, ``task_track_started``)."""
    app = make_app(spec)
    try:
        backend = app.backend
        store_one(app, spec, new_id())  # connect and load the script before the baseline
        client.flushall()
        gc.collect()
        before = int(client.info("memory")["used_memory"])
        last = ""
        for _ in range(n):
            last = new_id()
            if tracked:
                backend.store_result(last, {"pid": 4242, "hostname": "worker@host"}, "STARTED")
            else:
                store_one(app, spec, last)
        after = int(client.info("memory")["used_memory"])
        key = backend.layout.state(last) if tracked else _key_of(backend, last)
        usage = client.memory_usage(key, samples=0) or 0
        if client.dbsize() != n:
            raise RuntimeError(f"{spec.name}: {client.dbsize()} keys after {n} stores")
        client.flushall()
        return (after - before) / n, float(usage)
    finally:
        close_app(app)


def run_memory(bench: Bench) -> None:
    versions: dict[str, str] = {}
    for suffix, label, kind in SERVERS:
        try:
            binary = find_server_binary(kind)
        except FileNotFoundError as exc:
            bench.results.note(f"memory: {label} not measured: {exc}")
            continue
        with running_server(binary) as server:
            client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=60)
            versions[suffix] = _server_version(client)
            specs = {
                s.name: s for s in build_specs(server.port, bench.workdir, ("perkey", "redis"))
            }
            plan = [
                ("perkey", specs["perkey"], bench.sizes.memory, False),
                ("redis", specs["redis"], bench.sizes.memory, False),
                ("perkey-tracked", replace(specs["perkey"], name="perkey-tracked"),
                 bench.sizes.memory_tracked, True),
            ]  # fmt: skip
            # Every backend on db 0 of its own fresh server: same keyspace overhead.
            plan = [
                (name, replace(spec, url=spec.url.rsplit("/", 1)[0] + "/0"), n, tracked)
                for name, spec, n, tracked in plan
            ]
            for _ in bench.round_range(f"memory on {label}", rounds=bench.sizes.memory_rounds):
                for name, spec, n, tracked in plan:
                    per_result, usage = _measure(client, spec, n, tracked)
                    bench.results.add(f"mem_result@{suffix}", name, per_result)
                    bench.results.add(f"mem_key@{suffix}", name, usage)
            client.close()
    bench.results.meta["memory_servers"] = versions
    bench.results.meta["memory_value"] = repr(VALUE)
