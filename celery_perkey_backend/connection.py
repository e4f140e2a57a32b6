"""Clients and pools, deadlines on the wire, error translation, the one retry policy.

Celery builds one backend instance per thread, so pools are shared deliberately: every
instance in a process with the same URL and settings uses the same client. redis-py's
own retries are off (every connection gets zero retries): :class:`RetryPolicy` is the
only place a failed command is tried again, so attempt counts never multiply.

Deadlines reach the wire through :func:`bounded_by`: while a wait's deadline is in
force, every connection of ours bounds what it does by it. Connecting, the TLS and
Redis handshakes (also bounded by the connect timeout, always), every reply and the
wait for a free connection of the pool all end by the deadline plus a small margin,
whatever the server does, so no single command can hold a wait past its deadline.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import random
import ssl
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import MaxConnectionsError, RedisClusterException
from redis.retry import Retry
from redis.sentinel import (
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from .deadline import Deadline
from .errors import (
    AccessDeniedError,
    BackendUnavailableError,
    ConfigurationError,
    CredentialsRefusedError,
    PoolExhaustedError,
    ServerFullError,
    StoreCommandError,
    quote_id,
)
from .settings import RetrySettings, Settings
from .urls import mask_url, redact

__all__ = [
    "READ_MARGIN",
    "RetryPolicy",
    "blocking_call",
    "bounded_by",
    "client_for",
    "deadline_in_force",
    "driver_options",
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
#: over: all retried (a redirection only on a cluster URL: see :func:`redis_errors`).
RETRYABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.AskError,  # and MovedError, its subclass
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterError,  # ClusterDownError, MasterDownError
    redis.exceptions.SlotNotCoveredError,
)

#: After a burst, a pool keeps this many connections open...
TRIM_FLOOR = 10

#: ...once no more than that many have been in use for this long (seconds).
TRIM_AFTER = 30.0

#: No retries inside redis-py: the policy below is the only one.
_NO_RETRY = Retry(NoBackoff(), 0)

#: Whether redis-py's reads take a ``timeout`` of their own (redis-py 8 and newer). On
#: older ones, :class:`_Bounded` bounds a read by the socket's timeout instead.
_READ_TAKES_TIMEOUT = "timeout" in inspect.signature(redis.Connection.read_response).parameters

#: The deadline of the wait this thread (or asyncio task) is in, if any.
_deadline: ContextVar[Deadline | None] = ContextVar("perkey_deadline", default=None)


@contextmanager
def bounded_by(deadline: Deadline) -> Iterator[None]:
    """Bound everything our connections do in this block by ``deadline``.

    Connecting and the handshakes, every reply, and the wait for a free connection of
    the pool end by the deadline (replies: plus :data:`READ_MARGIN`).
    """
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def deadline_in_force() -> Deadline | None:
    """The deadline that :func:`bounded_by` put in force here, if any."""
    return _deadline.get()


def _left() -> float | None:
    deadline = _deadline.get()
    return None if deadline is None else deadline.remaining()


def _smaller(limit: float | None, other: float | None) -> float | None:
    if limit is None:
        return other
    if other is None:
        return limit
    return min(limit, other)


class _Bounded:
    """What our connections add to redis-py's: every step bounded by the deadline.

    The TCP connect, the TLS handshake and the Redis handshake (HELLO, AUTH, SELECT)
    take at most the connect timeout, and at most what is left of the deadline; each
    reply is read with at most what is left of it plus :data:`READ_MARGIN`. A read
    that times out drops the connection (redis-py does), so a late reply can never be
    taken for the next command's.
    """

    socket_timeout: float | None
    socket_connect_timeout: float | None
    _perkey_connecting = False

    def _connect(self) -> Any:
        limit = _smaller(self.socket_connect_timeout, _left())
        configured = self.socket_timeout, self.socket_connect_timeout
        # The socket takes its timeout from these while connecting: the TLS handshake
        # then waits no longer than a connect may take.
        self.socket_timeout = self.socket_connect_timeout = limit
        try:
            sock = super()._connect()  # type: ignore[misc]
        finally:
            self.socket_timeout, self.socket_connect_timeout = configured
        sock.settimeout(self.socket_timeout)
        return sock

    def on_connect_check_health(self, *args: Any, **kwargs: Any) -> Any:
        self._perkey_connecting = True
        try:
            return super().on_connect_check_health(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            # redis-py drops the socket after a RedisError only. Any other error (a
            # credential provider's own) would leave it connected and unauthenticated,
            # to be taken for a ready connection by the next command, which would then
            # run as the server's default user.
            self.disconnect()  # type: ignore[attr-defined]
            raise
        finally:
            self._perkey_connecting = False

    def on_connect(self) -> None:
        # What older redis-py (5.0) calls instead of on_connect_check_health.
        try:
            super().on_connect()  # type: ignore[misc]
        except BaseException:
            self.disconnect()  # type: ignore[attr-defined]
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if "timeout" not in kwargs:
            left = _left()
            limit = None if left is None else left + READ_MARGIN
            if self._perkey_connecting:
                limit = _smaller(limit, self.socket_connect_timeout)
            if limit is not None:
                kwargs["timeout"] = _smaller(self.socket_timeout, limit)
        if "timeout" in kwargs and not _READ_TAKES_TIMEOUT:
            return self._read_within(kwargs.pop("timeout"), *args, **kwargs)
        return super().read_response(*args, **kwargs)  # type: ignore[misc]

    def _read_within(self, timeout: float | None, *args: Any, **kwargs: Any) -> Any:
        """One reply within ``timeout``, on a redis-py (before 8) whose reads take no
        timeout: both its parsers read with the socket's, so it holds for this read.
        A read that times out drops the connection, as on redis-py 8."""
        sock = self._sock  # type: ignore[attr-defined]
        if sock is None:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        sock.settimeout(timeout)
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        finally:
            if self._sock is sock:  # type: ignore[attr-defined]
                sock.settimeout(self.socket_timeout)


class BoundedConnection(_Bounded, redis.Connection):
    """A TCP connection bounded by the deadline in force."""


class BoundedSSLConnection(_Bounded, redis.SSLConnection):
    """A TLS connection bounded by the deadline in force."""


class BoundedUnixConnection(_Bounded, redis.UnixDomainSocketConnection):
    """A unix socket connection bounded by the deadline in force."""


class BoundedSentinelConnection(_Bounded, SentinelManagedConnection):
    """A connection to the master the Sentinels name, bounded by the deadline."""


class BoundedSentinelSSLConnection(_Bounded, SentinelManagedSSLConnection):
    """A TLS connection to the master the Sentinels name, bounded by the deadline."""


class _Queueing:
    """A pool that queues for a connection when full, and closes idle ones after a burst.

    When ``redis_max_connections`` are all in use, redis-py's own pool fails at once
    ("Too many connections"). Here a caller waits until a connection is released, for
    as long as the deadline in force allows, or ``queue_timeout`` when none is (stores:
    as long as the retry policy would retry a lost connection); then
    :class:`PoolExhaustedError` names the setting.

    redis-py never closes a pool's idle connections, so a process that once ran 3,000
    waits at once would keep 3,000 server clients for its whole life. Once no more than
    :data:`TRIM_FLOOR` connections have been in use for :data:`TRIM_AFTER` seconds, the
    idle ones are closed (they reconnect when next used).
    """

    max_connections: int
    queue_timeout: float | None = None

    freed: threading.Condition
    trimmer: threading.Timer | None

    def reset(self) -> None:
        """redis-py's reset, which it also runs in a forked child before the child's
        first command: the child gets a lock of its own, not one another thread of the
        parent may have held at the fork (it would wait for it forever)."""
        super().reset()  # type: ignore[misc]
        self.freed = threading.Condition()
        self.in_use = 0
        self.busy_until = 0.0  # when more than TRIM_FLOOR were last in use
        self.burst = False  # more than TRIM_FLOOR were in use since the last trim
        self.trimmer = None

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        deadline = _deadline.get()
        limit = self.queue_timeout if deadline is None else deadline.remaining()
        end = None if limit is None else time.monotonic() + limit
        while True:
            try:
                connection = super().get_connection(*args, **kwargs)  # type: ignore[misc]
            except MaxConnectionsError:
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise MaxConnectionsError(
                        f"the client pool is exhausted: all redis_max_connections="
                        f"{self.max_connections} connections stayed in use"
                    ) from None
                with self.freed:
                    # Short waits: a release between the failed take and this wait
                    # must not be slept through.
                    self.freed.wait(0.05 if remaining is None else min(remaining, 0.05))
                continue
            with self.freed:
                self.in_use += 1
                if self.in_use > TRIM_FLOOR:
                    self.burst = True
                    self.busy_until = time.monotonic()
            return connection

    def release(self, connection: Any) -> None:
        super().release(connection)  # type: ignore[misc]
        with self.freed:
            self.in_use = max(0, self.in_use - 1)
            if self.in_use > TRIM_FLOOR:
                self.busy_until = time.monotonic()
            elif self.burst and self.trimmer is None:
                self._schedule_trim(TRIM_AFTER)
            self.freed.notify()

    def _schedule_trim(self, delay: float) -> None:
        self.trimmer = threading.Timer(delay, self._trim)
        self.trimmer.daemon = True
        self.trimmer.start()

    def _trim(self) -> None:
        with self.freed:
            self.trimmer = None
            quiet = time.monotonic() - self.busy_until
            if self.in_use > TRIM_FLOOR or quiet < TRIM_AFTER:
                self._schedule_trim(max(TRIM_AFTER - quiet, 0.01))
                return
            self.burst = False
        # Idle connections only: those in use stay connected.
        self.disconnect(inuse_connections=False)  # type: ignore[attr-defined]


class QueueingPool(_Queueing, redis.ConnectionPool):
    """redis-py's pool, queueing for a free connection instead of failing."""


class QueueingSentinelPool(_Queueing, SentinelConnectionPool):
    """redis-py's Sentinel pool, queueing for a free connection instead of failing."""


_clients: dict[tuple[str, str, str, int], redis.Redis] = {}
_clients_lock = threading.Lock()


def _fresh_clients_lock() -> None:
    """In a forked child: a lock of its own (another thread of the parent may have held
    this one at the fork, and would never release it here)."""
    global _clients_lock
    _clients_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_clients_lock)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def driver_options() -> dict[str, Any]:
    """How our connections name the library (``CLIENT SETINFO lib-name``/``lib-ver``).

    As Celery 5.7 names its own (``redis-py(celery_v5.7.0)``), with this package beside
    it: ``redis-py(celery_v5.7.0;celery-perkey-backend_v0.1.0)``, and redis-py's version.
    A redis-py with ``DriverInfo`` takes one; older ones ``lib_name`` and ``lib_version``. A
    server older than 7.2, or an ACL user without ``client|setinfo``, refuses the
    command; redis-py ignores that.
    """
    ours = ("celery-perkey-backend", _version("celery-perkey-backend"))
    celery = ("celery", _version("celery"))
    try:
        from redis import DriverInfo  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        drivers = ";".join(f"{name}_v{version}" for name, version in (celery, ours))
        return {"lib_name": f"redis-py({drivers})", "lib_version": redis.__version__}
    # The most recently added comes first.
    info = DriverInfo().add_upstream_driver(*ours).add_upstream_driver(*celery)
    return {"driver_info": info}


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
    BackendUnavailableError, CredentialsRefusedError
        If a cluster, which is reached as its client is built, cannot be reached, or
        refuses the password.
    """
    url, options = settings.redis_url, dict(settings.connection_options)
    transport = settings.transport_options
    shown = mask_url(settings.url)
    # Providers are told apart by identity: a provider's repr need not differ from
    # another's, and the cached client keeps its provider alive, so no id is reused.
    provider = options.pop("credential_provider", None)
    ident = (
        url,
        repr(sorted(options.items())),
        repr(sorted(transport.items())),
        0 if provider is None else id(provider),
    )
    with _clients_lock:
        client = _clients.get(ident)
        if client is None:
            try:
                client = _build(settings)
            except (ValueError, TypeError, redis.RedisError, RedisClusterException) as exc:
                # A cluster client connects as it is built: no node reachable, or a
                # password refused, is an outage or refused credentials, not a bad URL.
                lost = exc.__cause__
                if not isinstance(
                    lost, redis.ConnectionError | redis.TimeoutError | redis.AuthenticationError
                ):
                    # The parsers' errors may quote a piece of the URL.
                    why = redact(str(exc), settings.url, url)
                    raise ConfigurationError(f"result_backend {shown!r}: {why}") from None
            if client is None:
                # Raised here, outside the handler, so that no chain loops back.
                assert isinstance(lost, redis.RedisError)
                with redis_errors("connect to the cluster", settings.url):
                    raise lost
            _clients[ident] = client
    return client


def _build(settings: Settings) -> redis.Redis:
    url = settings.redis_url
    options = dict(settings.connection_options)
    transport = settings.transport_options
    # redis_backend_use_ssl: the TLS options came with the settings.
    tls = options.pop("ssl", False) or url.startswith("rediss://")
    options["retry"] = _NO_RETRY
    options.update(driver_options())
    queue_timeout = RetryPolicy(settings.retry).budget_s()
    if url.startswith("cluster://"):
        nodes, auth = _hosts(url, ",")
        if auth.pop("db", 0):
            raise ValueError("a cluster has only database 0")
        # Node pools are redis-py's and not capped. Given a URL, redis-py builds them
        # with our connection class (it takes TLS options then, not ``ssl``).
        options.pop("max_connections", None)
        options["connection_class"] = BoundedSSLConnection if tls else BoundedConnection
        from redis.cluster import ClusterNode

        (host, port), others = nodes[0], nodes[1:]
        startup = [ClusterNode(host, port) for host, port in others]  # type: ignore[no-untyped-call]
        return redis.RedisCluster(  # type: ignore[return-value]
            url=f"redis://{host}:{port}", startup_nodes=startup, **auth, **options
        )
    if url.startswith("sentinel://"):
        from redis.sentinel import Sentinel

        nodes, auth = _hosts(url, ";")
        master = transport.get("master_name") or auth.pop("master_name", None)
        if not master:
            raise ValueError("a sentinel:// backend needs master_name in its transport options")
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            nodes,
            min_other_sentinels=int(transport.get("min_other_sentinels") or 0),
            sentinel_kwargs=_sentinel_kwargs(transport, options),
            **auth,
            **options,
        )
        for client in sentinel.sentinels:
            # Discovery runs while connecting, under the deadline in force: bounded.
            node_pool = client.connection_pool
            node_pool.connection_class = _BOUNDED.get(
                node_pool.connection_class, node_pool.connection_class
            )
        pool_options: dict[str, Any] = {
            "connection_pool_class": QueueingSentinelPool,
            "connection_class": BoundedSentinelSSLConnection if tls else BoundedSentinelConnection,
        }
        if tls:
            pool_options["ssl"] = True
        master_client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            master, redis_class=redis.Redis, **pool_options
        )
        pool = master_client.connection_pool
        assert isinstance(pool, QueueingSentinelPool)
        pool.queue_timeout = queue_timeout
        return master_client
    if url.startswith("unix://"):
        # Options that make sense only for TCP.
        options.pop("socket_keepalive", None)
        options["connection_class"] = BoundedUnixConnection
    else:
        options["connection_class"] = BoundedSSLConnection if tls else BoundedConnection
    # redis-py caps a pool at 100 unless told otherwise; each blocked waiter holds a
    # connection, so without a setting we do not cap.
    options.setdefault("max_connections", 2**31)
    pool = QueueingPool.from_url(url, **options)
    pool.queue_timeout = queue_timeout
    return redis.Redis(connection_pool=pool)


#: The bounded connection class for each of redis-py's.
_BOUNDED: dict[type[Any], type[Any]] = {
    redis.Connection: BoundedConnection,
    redis.SSLConnection: BoundedSSLConnection,
    redis.UnixDomainSocketConnection: BoundedUnixConnection,
}


def _sentinel_kwargs(transport: Mapping[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The options of the clients that ask the Sentinels: ``sentinel_kwargs`` from the
    transport options, else the ``socket_*`` options (redis-py's own default), and
    never redis-py's retries (each Sentinel is asked once per attempt of the policy)."""
    given = transport.get("sentinel_kwargs")
    if given is None:
        given = {key: value for key, value in options.items() if key.startswith("socket_")}
    return {**driver_options(), **given, "retry": _NO_RETRY}


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
def redis_errors(
    where: str,
    url: str,
    key: str | None = None,
    cluster: bool = False,
    also: tuple[type[Exception], ...] = (),
) -> Iterator[None]:
    """Translate redis-py exceptions into this package's, naming what failed.

    Parameters
    ----------
    where:
        The operation, e.g. ``"store result of task 'abc'"``.
    url:
        The backend URL as the user wrote it; its password is masked.
    key:
        The key involved, if there is one.
    cluster:
        Whether the URL is a cluster URL. On one, a redirection (MOVED, ASK) is a slot
        that moves: retried. Otherwise the server is a node of a cluster that the URL
        does not describe: no retry can help.
    also:
        More errors that mean a lost connection (the transport option
        ``additional_connection_errors``): retried, as :data:`RETRYABLE` are.

    Raises
    ------
    ConfigurationError
        For a redirection (MOVED, ASK) on a URL that is not a cluster URL.
    AccessDeniedError
        For refused credentials or rights, and failed TLS handshakes: never retried.
    PoolExhaustedError
        When no connection of the client's own pool came free in time.
    BackendUnavailableError
        For lost or refused connections and socket timeouts.
    ServerFullError
        When the server is out of memory and refused a write.
    StoreCommandError
        For any other error the server or the client reports.
    """
    try:
        yield
    # Every message names the URL masked; what redis-py says is redacted of its secrets.
    except redis.AuthenticationError as exc:
        raise _refused(where, url, exc) from exc
    except redis.exceptions.NoPermissionError as exc:
        said = redact(str(exc), url)
        raise AccessDeniedError(
            f"{where}: Redis at {mask_url(url)} refused access: {said}"
        ) from exc
    except MaxConnectionsError as exc:
        raise PoolExhaustedError(f"{where}: {exc}") from exc
    except also as exc:
        said = redact(f"{type(exc).__name__}: {exc}", url)
        raise BackendUnavailableError(
            f"{where}: Redis at {mask_url(url)} is unavailable: {said}"
        ) from exc
    except RETRYABLE as exc:
        if isinstance(exc, redis.exceptions.AskError) and not cluster:
            raise ConfigurationError(_not_a_cluster_url(where, url, exc)) from exc
        tls = _tls_failure(exc)
        said = redact(str(exc if tls is None else tls), url)
        if tls is not None:
            raise CredentialsRefusedError(
                f"{where}: the TLS handshake with {mask_url(url)} failed: {said}{_tls_hint(tls)}"
            ) from exc
        raise BackendUnavailableError(
            f"{where}: Redis at {mask_url(url)} is unavailable: {said}{_tls_hint(exc)}"
        ) from exc
    except RedisClusterException as exc:
        # Not a RedisError: no node of the cluster could be reached to learn its slots.
        said = redact(str(exc), url)
        raise BackendUnavailableError(
            f"{where}: Redis at {mask_url(url)} is unavailable: {said}"
        ) from exc
    except redis.RedisError as exc:
        text = redact(str(exc), url)
        # In a pipeline redis-py puts "Command # 2 (WAIT 1 1000) of pipeline caused
        # error: " before the server's error; the server's code comes after it.
        code = text.rpartition("of pipeline caused error: ")[2]
        if isinstance(exc, redis.exceptions.ReadOnlyError) or code.startswith(
            ("UNBLOCKED", "LOADING", "READONLY")
        ):
            # A slot moved or a failover is under way: retry, as for a lost connection.
            raise BackendUnavailableError(
                f"{where}: Redis at {mask_url(url)} is changing its topology: {text}"
            ) from exc
        if code.startswith(("WRONGPASS", "NOAUTH")):
            raise _refused(where, url, exc) from exc
        if code.startswith("NOPERM"):
            raise AccessDeniedError(
                f"{where}: Redis at {mask_url(url)} refused access: {text}"
            ) from exc
        about = f" (key {quote_id(key)})" if key else ""
        if isinstance(exc, redis.exceptions.OutOfMemoryError):
            raise ServerFullError(f"{where}{about}: {text}") from exc
        if "WRONGTYPE" in text:
            text = "the key holds a value of another type than this backend writes"
        raise StoreCommandError(f"{where}{about}: {text}") from exc


def _not_a_cluster_url(where: str, url: str, redirection: redis.exceptions.AskError) -> str:
    kind = "MOVED" if isinstance(redirection, redis.exceptions.MovedError) else "ASK"
    return (
        f"{where}: Redis at {mask_url(url)} redirected the command elsewhere ({kind} "
        f"{redirection}): it is a node of a Redis Cluster, and the result_backend URL is "
        "not a cluster URL. Use perkey+cluster://host:port,host:port/0, naming one or "
        "more of the cluster's nodes."
    )


#: How servers word NOAUTH, for redis-py versions that do not keep the error's code.
_NOAUTH_TEXTS = ("NOAUTH", "Authentication required", "HELLO must be called with the client")


def _refused(where: str, url: str, exc: redis.RedisError) -> CredentialsRefusedError:
    """Our own words for credentials the server refused, or wants and did not get."""
    shown = mask_url(url)
    text = redact(str(exc), url)
    if getattr(exc, "status_code", None) == "NOAUTH" or text.startswith(_NOAUTH_TEXTS):
        return CredentialsRefusedError(
            f"{where}: Redis at {shown} requires a password, and none was given; give one "
            "in the URL (perkey://:password@host:6379/0, or user:password@) or in "
            "redis_password"
        )
    return CredentialsRefusedError(
        f"{where}: Redis at {shown} refused the password (or user) given: {text}"
    )


def _tls_hint(exc: BaseException) -> str:
    """A hint when a TLS handshake failed the way it does with a server that does not
    speak TLS: no answer to it at all, or an answer that is no TLS."""
    seen: BaseException | None = exc
    walked: set[int] = set()
    while seen is not None and id(seen) not in walked:
        walked.add(id(seen))
        if isinstance(seen, ssl.SSLCertVerificationError):
            return ""
        frames = traceback.extract_tb(seen.__traceback__)
        if isinstance(seen, ssl.SSLError) or (
            isinstance(seen, TimeoutError) and frames and frames[-1].name == "do_handshake"
        ):
            return " (does the server speak TLS? a rediss:// URL needs a TLS port)"
        seen = seen.__cause__ or seen.__context__
    return ""


def _tls_failure(exc: BaseException) -> BaseException | None:
    """The TLS error behind a connection error, unless it is a mere timeout.

    A certificate that fails verification, or a server that does not speak TLS and
    answers, cannot be cured by trying again.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) and not isinstance(seen, TimeoutError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class _Pauses:
    """The pause before each retry, as :class:`RetrySettings` says, never past a deadline."""

    def __init__(self, settings: RetrySettings, deadline: Deadline | None) -> None:
        self._settings = settings
        self._deadline = deadline

    def ceiling(self, failures: int) -> float:
        """The longest pause before retry ``failures``."""
        policy = self._settings
        if policy.exponential:
            return min(policy.max_pause_s, policy.first_pause_s * 2.0**failures)
        grown = policy.first_pause_s + policy.pause_step_s * (failures - 1)
        return min(grown, policy.max_pause_s)

    def compute(self, failures: int) -> float:
        pause = self.ceiling(failures)
        if self._settings.exponential:
            pause = random.uniform(0, pause)
        left = self._deadline.remaining() if self._deadline is not None else None
        return pause if left is None else min(pause, left)


class RetryPolicy:
    """The one policy by which lost connections are retried: stores, waits and chords.

    redis-py's clients themselves never retry (each has ``Retry(NoBackoff(), 0)``), so
    attempts never multiply.

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

    def budget_s(self) -> float | None:
        """The longest the policy pauses in all, retrying a lost connection; ``None``
        when it retries forever."""
        limit = self.settings.max_retries
        if limit is None:
            return None
        pauses = _Pauses(self.settings, None)
        return sum(pauses.ceiling(n) for n in range(1, limit + 1)) or 1.0

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

        pauses = _Pauses(self.settings, deadline)
        failures = 0
        while True:
            try:
                return op()
            except PoolExhaustedError:
                # A pool that stayed exhausted already waited as long as a retry would.
                raise
            except BackendUnavailableError as error:
                failures += 1
                fail(error, failures)
                pause = pauses.compute(failures)
                if pause > 0:
                    time.sleep(pause)
