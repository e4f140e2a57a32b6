"""Clients and pools, error translation, and the one retry policy.

Celery builds one backend instance per thread, so pools are shared deliberately: every
instance in a process with the same URL and settings uses the same client. redis-py's
own retries are off (every connection gets zero retries): :class:`RetryPolicy` is the
only place a failed command is tried again, so attempt counts never multiply.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.backoff import AbstractBackoff, NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from .deadline import Deadline
from .errors import BackendUnavailableError, ConfigurationError, StoreCommandError
from .settings import RetrySettings, Settings
from .urls import mask_url

__all__ = [
    "READ_MARGIN",
    "RetryPolicy",
    "blocking_call",
    "client_for",
    "node_client",
    "primaries",
    "redis_errors",
]

logger = logging.getLogger("celery_perkey_backend")

T = TypeVar("T")

#: How much longer than a block its reply may take (the server's clock tick, a busy
#: machine) before the connection counts as dead.
READ_MARGIN = 0.5

#: Lost connections, and errors of a cluster whose slots move or whose primaries fail
#: over: all retried.
RETRYABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.AskError,  # and MovedError, its subclass
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterError,  # ClusterDownError, MasterDownError
    redis.exceptions.SlotNotCoveredError,
)

#: No retries inside redis-py: the policy below is the only one.
_NO_RETRY = Retry(NoBackoff(), 0)

_clients: dict[tuple[str, str, str], redis.Redis] = {}
_clients_lock = threading.Lock()


def client_for(settings: Settings) -> redis.Redis:
    """A client on the process-wide pool (or cluster, or Sentinel) for ``settings``.

    ``cluster://h:p,h:p/0`` gives a :class:`redis.RedisCluster`;
    ``sentinel://h:p;sentinel://h:p/0`` a client of the master that the Sentinels name
    (``master_name`` and ``sentinel_kwargs`` come from the transport options, as in
    Celery's ``sentinel://`` backend).

    Raises
    ------
    ConfigurationError
        If redis-py rejects the URL or an option; the URL is masked in the message.
    """
    url, options = settings.redis_url, settings.connection_options
    transport = settings.transport_options
    shown = mask_url(settings.url)
    ident = (url, repr(sorted(options.items())), repr(sorted(transport.items())))
    with _clients_lock:
        client = _clients.get(ident)
        if client is None:
            try:
                client = _build(url, dict(options), transport)
            except (ValueError, TypeError, redis.RedisError, RedisClusterException) as exc:
                raise ConfigurationError(f"result_backend {shown!r}: {exc}") from None
            _clients[ident] = client
    return client


def _build(url: str, options: dict[str, Any], transport: Mapping[str, Any]) -> redis.Redis:
    # redis_backend_use_ssl: each client kind takes TLS its own way.
    tls = options.pop("ssl", False)
    options["retry"] = _NO_RETRY
    if url.startswith(("cluster://", "sentinel://")) and tls:
        options["ssl"] = True
    if url.startswith("cluster://"):
        nodes, auth = _hosts(url, ",")
        if auth.pop("db", 0):
            raise ValueError("a cluster has only database 0")
        options.pop("max_connections", None)
        from redis.cluster import ClusterNode

        startup = [ClusterNode(host, port) for host, port in nodes]  # type: ignore[no-untyped-call]
        return redis.RedisCluster(startup_nodes=startup, **auth, **options)  # type: ignore[return-value]
    if url.startswith("sentinel://"):
        from redis.sentinel import Sentinel

        nodes, auth = _hosts(url, ";")
        master = transport.get("master_name") or auth.pop("master_name", None)
        if not master:
            raise ValueError("a sentinel:// backend needs master_name in its transport options")
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            nodes, sentinel_kwargs=transport.get("sentinel_kwargs"), **auth, **options
        )
        master_client: redis.Redis = sentinel.master_for(master, redis_class=redis.Redis)  # type: ignore[no-untyped-call]
        return master_client
    if url.startswith("unix://"):
        # Options that make sense only for TCP.
        options.pop("socket_keepalive", None)
    elif tls:
        options["connection_class"] = redis.SSLConnection
    # redis-py caps a pool at 100 unless told otherwise; each blocked waiter holds a
    # connection, so without a setting we do not cap.
    options.setdefault("max_connections", 2**31)
    return redis.Redis(connection_pool=redis.ConnectionPool.from_url(url, **options))


def _hosts(url: str, separator: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The (host, port) pairs of a multi-host URL, and its credentials, db and query."""
    nodes: list[tuple[str, int]] = []
    extra: dict[str, Any] = {}
    for part in url.split(separator):
        if "://" not in part:
            part = url.split("://", 1)[0] + "://" + part
        parsed = urlsplit(part)
        if parsed.hostname:
            nodes.append((parsed.hostname, parsed.port or 6379))
        if parsed.password:
            extra["password"] = unquote(parsed.password)
        if parsed.username:
            extra["username"] = unquote(parsed.username)
        db = parsed.path.strip("/")
        if db:
            extra["db"] = int(db)
        for key, value in parse_qsl(parsed.query):
            extra[key] = value
    if not nodes:
        raise ValueError("no host:port given")
    return nodes, extra


def node_client(client: redis.Redis | redis.RedisCluster, key: str) -> redis.Redis:
    """The client of the server that holds ``key``: itself, or its cluster primary."""
    if isinstance(client, redis.RedisCluster):
        node = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
        found: redis.Redis = client.get_redis_connection(node)
        return found
    return client


def primaries(client: redis.Redis) -> list[redis.Redis]:
    """A client per primary: the server itself, or every primary of a cluster."""
    if isinstance(client, redis.RedisCluster):
        return [client.get_redis_connection(node) for node in client.get_primaries()]
    return [client]


def blocking_call(client: redis.Redis, key: str, seconds: float, *args: Any) -> Any:
    """Run one blocking command whose reply may take up to ``seconds``.

    The reply is read with a timeout of ``seconds`` plus :data:`READ_MARGIN`, not the
    pool's socket timeout, so a server that stops answering (a blackholed link) cannot
    hold a wait past its deadline by more than the margin. The raw reply is returned.

    Raises
    ------
    redis.TimeoutError
        If no reply came in time; the connection is then dropped, not reused.
    """
    if isinstance(client, redis.RedisCluster):
        # Straight to the node that owns the key. A MOVED or ASK (a slot migrating)
        # refreshes the slot map, and the caller's retry goes to the new owner.
        try:
            return blocking_call(node_client(client, key), key, seconds, *args)
        except (redis.exceptions.AskError, redis.ConnectionError):
            client.nodes_manager.initialize()
            raise
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_command(*args)  # type: ignore[no-untyped-call]
        return conn.read_response(timeout=seconds + READ_MARGIN)
    finally:
        pool.release(conn)


@contextmanager
def redis_errors(where: str, url: str, key: str | None = None) -> Iterator[None]:
    """Translate redis-py exceptions into this package's, naming what failed.

    Parameters
    ----------
    where:
        The operation, e.g. ``"store result of task 'abc'"``.
    url:
        The backend URL as the user wrote it; its password is masked.
    key:
        The key involved, if there is one.

    Raises
    ------
    BackendUnavailableError
        For lost or refused connections and socket timeouts.
    StoreCommandError
        For any other error the server or the client reports.
    """
    try:
        yield
    except RETRYABLE as exc:
        raise BackendUnavailableError(
            f"{where}: Redis at {mask_url(url)} is unavailable: {exc}"
        ) from exc
    except redis.RedisError as exc:
        text = str(exc)
        if text.startswith(("UNBLOCKED", "LOADING", "READONLY")):
            # A slot moved or a failover is under way: retry, as for a lost connection.
            raise BackendUnavailableError(
                f"{where}: Redis at {mask_url(url)} is changing its topology: {exc}"
            ) from exc
        about = f" (key {key!r})" if key else ""
        if "WRONGTYPE" in text:
            text = "the key holds a value of another type than this backend writes"
        raise StoreCommandError(f"{where}{about}: {text}") from exc


class _Pauses(AbstractBackoff):
    """The pause before each retry, as :class:`RetrySettings` says, never past a deadline."""

    def __init__(self, settings: RetrySettings, deadline: Deadline | None) -> None:
        self._settings = settings
        self._deadline = deadline

    def reset(self) -> None:
        pass

    def compute(self, failures: int) -> float:
        policy = self._settings
        if policy.exponential:
            pause = random.uniform(0, min(policy.max_pause_s, policy.first_pause_s * 2**failures))
        else:
            pause = min(
                policy.first_pause_s + policy.pause_step_s * (failures - 1), policy.max_pause_s
            )
        left = self._deadline.remaining() if self._deadline is not None else None
        return pause if left is None else min(pause, left)


class RetryPolicy:
    """The one policy by which lost connections are retried: stores, waits and chords.

    It runs on redis-py's :class:`~redis.retry.Retry`; redis-py's clients themselves
    never retry, so attempts never multiply.

    Parameters
    ----------
    settings:
        How many retries, and the pauses between them.
    """

    def __init__(self, settings: RetrySettings) -> None:
        self.settings = settings

    @property
    def max_retries(self) -> int | None:
        return self.settings.max_retries

    def call(
        self,
        op: Callable[[], T],
        what: str,
        deadline: Deadline | None = None,
        on_retry: Callable[[Exception, int], None] | None = None,
    ) -> T:
        """Run ``op``, retrying a :class:`BackendUnavailableError` by the policy.

        Parameters
        ----------
        op:
            The operation; it raises this package's errors.
        what:
            Named in the log line of each retry.
        deadline:
            No retry starts, and no pause lasts, past it.
        on_retry:
            Called instead of logging, with the error and the retry's number.

        Raises
        ------
        BackendUnavailableError
            The last failure, once retries or the deadline run out.
        """
        limit = self.settings.max_retries

        def fail(error: Exception, failures: int) -> None:
            if (limit is not None and failures > limit) or (
                deadline is not None and deadline.expired
            ):
                raise error
            if on_retry is not None:
                on_retry(error, failures)
            else:
                logger.warning(
                    "perkey: %s failed (%s); retry %d/%s",
                    what,
                    error,
                    failures,
                    "inf" if limit is None else limit,
                )

        retry = Retry(
            _Pauses(self.settings, deadline),
            -1 if limit is None else limit,
            supported_errors=(BackendUnavailableError,),
        )
        return retry.call_with_retry(op, fail, with_failure_count=True)
