"""The state one benchmark run shares between its figures."""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
from celery import Celery

from .common import (
    BackendSpec,
    Budget,
    Results,
    Sizes,
    blocked_waiters,
    close_app,
    make_app,
    new_id,
    raw_client,
)
from .helper import Helper


@dataclass
class Bench:
    """Everything a figure needs: sizes, backends, apps, the helper process, results.

    With ``cluster_ports`` (the primaries of a Redis Cluster) the plain clients are
    :class:`redis.RedisCluster` clients and a waiter is seen on whichever primary holds
    its key; ``port`` is then one of those primaries.
    """

    sizes: Sizes
    rounds: int
    results: Results
    budget: Budget
    port: int
    workdir: Path
    specs: list[BackendSpec]
    helper: Helper
    pool: str = "prefork"
    cluster_ports: tuple[int, ...] = ()
    #: Another revision's package directory, for the baseline side of figure 10.
    baseline: Path | None = None
    #: Figure 3 also times perkey's multiplexed waits (``get()`` multiplexed and
    #: ``aio.wait``) beside the per-connection one: the main run only.
    multiplexed_wake: bool = False
    apps: dict[str, Celery] = field(default_factory=dict)
    clients: dict[int, redis.Redis] = field(default_factory=dict)
    _sink: str | None = None
    _monitors: list[redis.Redis] = field(default_factory=list)

    # -- backends and apps --------------------------------------------------------

    def spec(self, name: str) -> BackendSpec:
        for spec in self.specs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def has(self, name: str) -> bool:
        return any(spec.name == name for spec in self.specs)

    @property
    def celery_specs(self) -> list[BackendSpec]:
        """Every backend except the raw redis-py floor."""
        return [spec for spec in self.specs if not spec.is_raw]

    def app(self, name: str) -> Celery:
        """This run's app for backend ``name``; an rpc app consumes its reply queue."""
        if name not in self.apps:
            app = make_app(self.spec(name))
            if self.spec(name).is_rpc:
                app.backend.result_consumer.consume_from(new_id())
            self.apps[name] = app
        return self.apps[name]

    def reply_to(self, spec: BackendSpec) -> str | None:
        """Where results for this process go (rpc only): its reply queue."""
        return str(self.app(spec.name).backend.oid) if spec.is_rpc else None

    def sink(self) -> str:
        """A scratch queue on RabbitMQ for rpc results nobody reads (the store figure)."""
        if self._sink is None:
            name = f"bench.sink.{uuid.uuid4().hex[:8]}"
            with self.app("rpc").connection_for_write() as conn:
                conn.default_channel.queue_declare(name, durable=False, auto_delete=False)
            self._sink = name
        return self._sink

    def purge_sink(self) -> None:
        if self._sink is not None:
            with self.app("rpc").connection_for_write() as conn:
                conn.default_channel.queue_purge(self._sink)

    def client(self, db: int = 0) -> redis.Redis:
        """A plain redis-py client on the private server (or on the cluster: db 0 only)."""
        if db not in self.clients:
            self.clients[db] = raw_client(self.port, self.cluster_ports, db, 60)
        return self.clients[db]

    def pinger(self, db: int = 0) -> Callable[[], object]:
        """One PING round trip; on a cluster, through the cluster client to one primary
        (the primaries in turn), not to every node as ``RedisCluster.ping()`` does."""
        client = self.client(db)
        if not self.cluster_ports:
            return client.ping
        primaries = client.get_primaries()
        turn = itertools.cycle(primaries)
        return lambda: client.ping(target_nodes=next(turn))

    def blocked_clients(self) -> int:
        """Clients blocked in a wait of their own on the server (multiplexers' inbox
        readers left out: :func:`~.common.blocked_waiters`), or summed over the
        primaries."""
        if not self.cluster_ports:
            return blocked_waiters(self.client(0))
        if not self._monitors:
            self._monitors = [
                redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
                for port in self.cluster_ports
            ]
        return sum(blocked_waiters(m) for m in self._monitors)

    # -- rounds -------------------------------------------------------------------

    def round_range(
        self, figure: str, heavy: bool = False, rounds: int | None = None
    ) -> Iterator[int]:
        """Round numbers for a figure; stops early (and says so) once time runs out.

        ``heavy`` figures take at most ``sizes.heavy_rounds``; ``rounds`` caps further.
        """
        total = min(self.rounds, self.sizes.heavy_rounds) if heavy else self.rounds
        if rounds is not None:
            total = min(total, rounds)
        for number in range(total):
            if self.budget.exhausted:
                self.results.note(
                    f"{figure}: stopped after {number} of {total} rounds (time budget)."
                )
                return
            yield number

    def close(self) -> None:
        if self._sink is not None:
            with contextlib.suppress(Exception), self.app("rpc").connection_for_write() as conn:
                conn.default_channel.queue_delete(self._sink)
        for app in self.apps.values():
            close_app(app)
        for client in [*self.clients.values(), *self._monitors]:
            client.close()
