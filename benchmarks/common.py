"""What every figure shares: sizes, backend definitions, apps, clocks and statistics."""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
import time
import types
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent

#: Databases on the private server: one per backend, so that no figure sees another's keys.
DB_PERKEY = 0
DB_PERKEY_ONCE = 1
DB_REDIS = 2
DB_BROKER = 3
DB_RAW = 4
DB_SWEEP = 5
DB_ORPHANS = 6

#: The value every task returns and every store writes: a small, typical dict.
VALUE: dict[str, Any] = {
    "id": 4711,
    "status": "done",
    "rows": 250,
    "path": "/exports/2024/q1/report.csv",
    "tags": ["daily", "eu"],
}

#: How long any single wait of the harness may take before it counts as a failure.
GET_TIMEOUT = 30.0

_app_numbers = itertools.count()


def raw_client(
    port: int, cluster_ports: Sequence[int], db: int, socket_timeout: float
) -> redis.Redis:
    """A plain client of the benchmark's server, or of its cluster when there is one."""
    if cluster_ports:
        if db:
            raise ValueError("a cluster has only database 0")
        from redis.cluster import ClusterNode

        nodes = [ClusterNode("127.0.0.1", p) for p in cluster_ports]
        return redis.RedisCluster(startup_nodes=nodes, socket_timeout=socket_timeout)  # type: ignore[return-value]
    return redis.Redis(host="127.0.0.1", port=port, db=db, socket_timeout=socket_timeout)


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns: one clock for every process on a Linux machine."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class Sizes:
    """How many operations each figure makes per backend and round."""

    store: int = 300
    read: int = 300
    wake: int = 200
    wake_polling: int = 20
    group: int = 1000
    publish: int = 2000
    e2e_sequential: int = 50
    e2e_sequential_polling: int = 10
    burst: int = 5000
    memory: int = 50_000
    memory_tracked: int = 10_000
    memory_rounds: int = 2
    threads: int = 1000
    sweep_keys: int = 1_000_000
    orphans: int = 1000
    #: Figure 11: the rows, concurrent waits in one process.
    many_waiters: tuple[int, ...] = (1000, 10_000, 50_000)
    #: Figure 11: the largest row the thread modes run at (a thread per wait).
    many_threads: int = 1000
    #: Figure 11: the largest row the modes with a connection per wait run at.
    many_per_connection: int = 10_000
    #: Figure 11: the server's ``maxclients`` while it runs (10,000: Redis's default).
    many_maxclients: int = 10_000
    #: Rounds of the figures that take seconds per round (memory, e2e burst, sweep,
    #: many waiters), at most; the others use every round.
    heavy_rounds: int = 3

    def with_overrides(self, pairs: Iterable[str]) -> Sizes:
        """Apply ``name=value`` overrides, e.g. ``sweep_keys=300000``, or for a field
        that holds several sizes ``many_waiters=1000,10000``.

        Raises
        ------
        ValueError
            If a name is not a field or a value not an integer.
        """
        known = {f.name for f in fields(self)}
        changes: dict[str, int | tuple[int, ...]] = {}
        for pair in pairs:
            name, sep, value = pair.partition("=")
            if not sep or name not in known:
                raise ValueError(f"--size {pair!r}: use NAME=INT with NAME one of {sorted(known)}")
            if isinstance(getattr(self, name), tuple):
                changes[name] = tuple(int(v.replace("_", "")) for v in value.split(","))
            else:
                changes[name] = int(value.replace("_", ""))
        return replace(self, **changes)  # type: ignore[arg-type]

    def describe(self) -> str:
        """``name=value, ...`` for the results' header (several sizes joined by ``/``)."""
        return ", ".join(
            f"{name}={'/'.join(map(str, value)) if isinstance(value, tuple) else value}"
            for name, value in vars(self).items()
            if name != "heavy_rounds"
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Sizes:
        """The inverse of :func:`dataclasses.asdict` through JSON (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


FULL = Sizes()
QUICK = Sizes(
    store=30,
    read=30,
    wake=20,
    wake_polling=3,
    group=100,
    publish=200,
    e2e_sequential=5,
    e2e_sequential_polling=2,
    burst=200,
    memory=2000,
    memory_tracked=500,
    memory_rounds=1,
    threads=20,
    sweep_keys=5000,
    orphans=100,
    many_waiters=(200, 1000),
    many_threads=200,
    many_per_connection=200,
    heavy_rounds=1,
)


@dataclass(frozen=True)
class BackendSpec:
    """One backend under test, picklable so that helper processes can rebuild it.

    ``probe`` says how a helper process knows that a waiter of this backend is
    waiting: ``blocked`` (a client is in a blocking command), ``subscribed`` (the
    task's pub/sub channel has a subscriber) or ``sleep`` (no way to see it: wait).
    """

    name: str
    label: str
    url: str
    broker: str
    conf: tuple[tuple[str, Any], ...] = ()
    polling: bool = False
    probe: str = "sleep"
    redis_db: int | None = None

    @property
    def is_raw(self) -> bool:
        return self.name == "raw"

    @property
    def is_rpc(self) -> bool:
        return self.name == "rpc"


#: The order of backends in every round and every table.
ORDER = ("perkey", "perkey-once", "redis", "rpc", "sqlite", "raw")

LABELS = {
    "perkey": "perkey://",
    "perkey-once": "perkey:// read-once",
    "redis": "redis://",
    "rpc": "rpc:// (RabbitMQ)",
    "sqlite": "db+sqlite://",
    "raw": "raw redis-py (floor)",
    "perkey-tracked": "perkey:// running (STARTED)",
    "perkey-hiredis": "perkey:// with hiredis",
    "perkey-python": "perkey:// pure-Python parser",
    "perkey-baseline": "perkey:// --baseline tree, with hiredis",
    "perkey-mux": "perkey:// get(), multiplexed",
    "perkey-aio": "perkey:// aio.wait()",
}

#: Figure 11's ways of waiting, in the order each round runs them: row name, label.
MANY_MODES: dict[str, str] = {
    "many-aio": "perkey:// asyncio, aio.wait() each",
    "many-gevent": "perkey:// gevent, get() (multiplex auto)",
    "many-threads-mux": "perkey:// threads, get() multiplexed",
    "many-threads": "perkey:// threads, get() a connection each",
    "many-redis-threads": "redis:// threads, get()",
    "many-redis-gevent": "redis:// gevent, get()",
    "many-poll": "polling await: GET + asyncio.sleep(0.1)",
}

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672//"


def build_specs(port: int, workdir: Path, names: Sequence[str]) -> list[BackendSpec]:
    """The backends named in ``names`` (a subset of :data:`ORDER`), in that order."""
    host = f"127.0.0.1:{port}"
    broker = f"redis://{host}/{DB_BROKER}"
    every = {
        "perkey": BackendSpec(
            "perkey", LABELS["perkey"], f"perkey://{host}/{DB_PERKEY}", broker,
            probe="blocked", redis_db=DB_PERKEY,
        ),
        "perkey-once": BackendSpec(
            "perkey-once", LABELS["perkey-once"], f"perkey://{host}/{DB_PERKEY_ONCE}", broker,
            conf=(("perkey_read_once", True),), probe="blocked", redis_db=DB_PERKEY_ONCE,
        ),
        "redis": BackendSpec(
            "redis", LABELS["redis"], f"redis://{host}/{DB_REDIS}", broker,
            probe="subscribed", redis_db=DB_REDIS,
        ),
        "rpc": BackendSpec("rpc", LABELS["rpc"], "rpc://", RABBIT_URL),
        "sqlite": BackendSpec(
            "sqlite", LABELS["sqlite"], f"db+sqlite:///{workdir / 'results.sqlite'}", broker,
            polling=True,
        ),
        "raw": BackendSpec(
            "raw", LABELS["raw"], f"redis://{host}/{DB_RAW}", broker,
            probe="blocked", redis_db=DB_RAW,
        ),
    }  # fmt: skip
    return [every[name] for name in ORDER if name in names]


def make_app(spec: BackendSpec, queue: str | None = None, **conf: Any) -> Celery:
    """A Celery app for ``spec`` with the ``bench.echo`` task, not set as current."""
    app = Celery(f"bench_{spec.name}_{next(_app_numbers)}", set_as_current=False)
    app.conf.update(
        broker_url=spec.broker,
        result_backend=spec.url,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=3,
        task_default_queue=queue or f"bench.{spec.name}.{uuid.uuid4().hex[:8]}",
        worker_hijack_root_logger=False,
    )
    app.conf.update(dict(spec.conf))
    app.conf.update(conf)

    @app.task(name="bench.echo", shared=False)
    def echo(value: Any) -> Any:
        return value

    return app


def close_app(app: Celery) -> None:
    """Release what an app holds: pub/sub or AMQP consumers, pools, the broker pool."""
    backend = app.backend
    consumer = getattr(backend, "result_consumer", None)
    if consumer is not None and (
        getattr(consumer, "_pubsub", None) is not None
        or getattr(consumer, "_consumer", None) is not None
    ):
        with contextlib.suppress(Exception):
            consumer.stop()
    client = backend.__dict__.get("client")
    if client is not None and type(backend).__name__ == "RedisBackend":
        with contextlib.suppress(Exception):
            client.connection_pool.disconnect()
    with contextlib.suppress(Exception):
        app.close()


def rpc_request(task_id: str, reply_to: str) -> Any:
    """The part of a task request the rpc backend needs to address a reply."""
    return types.SimpleNamespace(
        id=task_id, reply_to=reply_to, correlation_id=task_id, children=[], group=None
    )


def store_one(app: Celery, spec: BackendSpec, task_id: str, reply_to: str | None = None) -> None:
    """``app.backend.store_result`` of :data:`VALUE` as a SUCCESS."""
    request = rpc_request(task_id, reply_to or "") if spec.is_rpc else None
    app.backend.store_result(task_id, VALUE, "SUCCESS", request=request)


# -- statistics ----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


@dataclass(frozen=True)
class Metric:
    """One figure's quantity: where it goes in the report and how to read it."""

    key: str
    section: str
    title: str
    unit: str  # "ns", "per_s", "bytes", "count", "ratio"
    lower_is_better: bool = True


@dataclass
class Results:
    """Per-round values of every metric for every backend, and what could not run."""

    values: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    samples: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, metric: str, backend: str, value: float) -> None:
        self.values.setdefault((metric, backend), []).append(float(value))

    def add_samples(self, metric: str, backend: str, samples: Iterable[float]) -> None:
        self.samples.setdefault((metric, backend), []).extend(float(s) for s in samples)

    def get(self, metric: str, backend: str) -> list[float]:
        return self.values.get((metric, backend), [])

    def backends_for(self, metric: str) -> list[str]:
        seen = [b for (m, b) in self.values if m == metric]
        return sorted(set(seen), key=_backend_rank)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def row_label(name: str) -> str:
    """A row's label: a backend's, or for figure 11's ``<mode>@<waits>`` the mode's and
    the number of waits."""
    mode, sep, waits = name.partition("@")
    if sep and mode in MANY_MODES:
        return f"{MANY_MODES[mode]}, {int(waits):,} waits"
    return LABELS.get(name, name)


def _backend_rank(name: str) -> tuple[int, int, int, str]:
    order = [*ORDER[:1], "perkey-tracked", "perkey-mux", "perkey-aio", *ORDER[1:]]
    mode, sep, waits = name.partition("@")
    if sep and mode in MANY_MODES:
        return (len(order) + 1, int(waits), list(MANY_MODES).index(mode), name)
    return (order.index(name) if name in order else len(order), 0, 0, name)


class Budget:
    """An overall deadline for the run: figures past it are reported as not run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    @property
    def exhausted(self) -> bool:
        return self.left() <= 0


def blocked_waiters(client: redis.Redis) -> int:
    """Clients blocked in a wait of their own (BLMOVE, BRPOPLPUSH, BRPOP...), on one
    server: every blocked client but the multiplexers' inbox readers (BLPOP), whose
    blocks outlive their last wait by up to 5 s and would blur the count."""
    return sum(
        1 for c in client.client_list() if "b" in c.get("flags", "") and c.get("cmd") != "blpop"
    )


def wait_until(condition: Callable[[], bool], limit: float, pause: float = 0.0005) -> bool:
    """Poll ``condition`` until it holds or ``limit`` seconds pass; whether it held."""
    end = time.monotonic() + limit
    while True:
        if condition():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(pause)
