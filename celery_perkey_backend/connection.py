"""Backend URLs, connection settings, shared pools and error translation.

Celery builds one backend instance per thread, so pools are shared deliberately: every
instance in a process with the same URL and settings uses the same pool.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis
from redis.exceptions import RedisClusterException

from .errors import BackendUnavailableError, ConfigurationError, StoreCommandError

__all__ = [
    "client_for",
    "connection_kwargs",
    "mask_url",
    "node_client",
    "redis_errors",
    "to_redis_url",
]

#: Schemes we accept after ``perkey+``, and what redis-py calls them.
_SCHEMES = {
    "perkey": "redis",
    "redis": "redis",
    "rediss": "rediss",
    "unix": "unix",
    "cluster": "cluster",
    "sentinel": "sentinel",
}

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

#: How Celery spells certificate requirements, mapped to what redis-py takes.
_CERT_REQS = {
    "cert_required": "required",
    "cert_optional": "optional",
    "cert_none": "none",
    "required": "required",
    "optional": "optional",
    "none": "none",
}

_SECRET_QUERY_ARGS = {"password", "sentinel_password"}

_clients: dict[tuple[str, str, str], redis.Redis] = {}
_pools_lock = threading.Lock()


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``**``, for logs and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:**@", url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:**@{hostinfo}" if colon else f"{userinfo}@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "**" if k in _SECRET_QUERY_ARGS else v) for k, v in pairs])
    return _unsplit(parts.scheme, netloc, parts.path, query)


def _unsplit(scheme: str, netloc: str, path: str, query: str) -> str:
    # urlunsplit drops the "//" of an empty host, which unix:///path needs.
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")


def to_redis_url(url: str | None) -> str:
    """Turn the URL Celery hands us into one redis-py understands.

    ``perkey://h/0`` arrives unchanged and becomes ``redis://h/0``; ``perkey+rediss://``
    arrives as ``rediss://`` already. Celery spells certificate requirements
    ``CERT_REQUIRED``; redis-py wants ``required``.

    Raises
    ------
    ConfigurationError
        If the scheme is not one we can connect with.
    """
    if not url:
        return "redis://localhost:6379/0"
    scheme, sep, rest = url.partition("://")
    target = _SCHEMES.get(scheme.lower())
    if not sep or target is None:
        raise ConfigurationError(
            f"result_backend {mask_url(url)!r}: unsupported scheme {scheme!r}; use "
            "perkey://, perkey+redis://, perkey+rediss:// or perkey+unix://"
        )
    converted = f"{target}://{rest}"
    parts = urlsplit(converted)
    if parts.query:
        pairs = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key == "ssl_cert_reqs":
                if value.lower() not in _CERT_REQS:
                    raise ConfigurationError(
                        f"result_backend {mask_url(url)!r}: ssl_cert_reqs={value!r} is not one "
                        "of CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE"
                    )
                value = _CERT_REQS[value.lower()]
            elif key.startswith("ssl_") and target == "redis":
                raise ConfigurationError(
                    f"result_backend {mask_url(url)!r}: TLS options need perkey+rediss://"
                )
            pairs.append((key, value))
        converted = _unsplit(parts.scheme, parts.netloc, parts.path, urlencode(pairs))
    return converted


#: Celery settings passed to redis-py when set, and the redis-py option each becomes.
_OPTIONAL_SETTINGS = {
    "redis_retry_on_timeout": "retry_on_timeout",
    "redis_backend_health_check_interval": "health_check_interval",
    "redis_client_name": "client_name",
    "redis_socket_keepalive": "socket_keepalive",
    "redis_username": "username",
    "redis_password": "password",
}


def connection_kwargs(conf: Mapping[str, Any]) -> dict[str, Any]:
    """Map the ``redis_*`` Celery settings a Redis user already sets to redis-py options.

    Values in the URL's query string win over these, as they do in Celery.
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": _float_or_none(conf.get("redis_socket_timeout")),
        "socket_connect_timeout": _float_or_none(conf.get("redis_socket_connect_timeout")),
        # redis-py caps a pool at 100 unless told otherwise; each blocked waiter holds
        # a connection, so without a setting we do not cap.
        "max_connections": conf.get("redis_max_connections") or 2**31,
    }
    # Passed on only when set: redis-py warns about some of them, and a cluster or a
    # unix socket refuses others.
    for setting, option in _OPTIONAL_SETTINGS.items():
        if conf.get(setting):
            kwargs[option] = conf[setting]
    ssl = conf.get("redis_backend_use_ssl")
    if ssl:
        kwargs.update(ssl)
        kwargs["connection_class"] = redis.SSLConnection
        reqs = kwargs.get("ssl_cert_reqs")
        if isinstance(reqs, str):
            kwargs["ssl_cert_reqs"] = _CERT_REQS.get(reqs.lower(), reqs)
    return kwargs


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def client_for(
    url: str, kwargs: Mapping[str, Any], transport_options: Mapping[str, Any] | None = None
) -> redis.Redis:
    """A client on the process-wide pool (or cluster, or Sentinel) for ``url``.

    ``cluster://h:p,h:p/0`` gives a :class:`redis.RedisCluster`;
    ``sentinel://h:p;sentinel://h:p/0`` a client of the master that the Sentinels name
    (``master_name`` and ``sentinel_kwargs`` come from the transport options, as in
    Celery's ``sentinel://`` backend).

    Raises
    ------
    ConfigurationError
        If redis-py rejects the URL or an option; the URL is masked in the message.
    """
    options = transport_options or {}
    ident = (url, repr(sorted(kwargs.items(), key=lambda item: item[0])), repr(options))
    with _pools_lock:
        client = _clients.get(ident)
        if client is None:
            try:
                client = _build(url, dict(kwargs), options)
            except (ValueError, TypeError, redis.RedisError, RedisClusterException) as exc:
                raise ConfigurationError(f"result_backend {mask_url(url)!r}: {exc}") from None
            _clients[ident] = client
    return client


def _build(url: str, options: dict[str, Any], transport: Mapping[str, Any]) -> redis.Redis:
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


@contextmanager
def redis_errors(where: str, url: str, key: str | None = None) -> Iterator[None]:
    """Translate redis-py exceptions into this package's, naming what failed.

    Parameters
    ----------
    where:
        The operation, e.g. ``"store result of task 'abc'"``.
    url:
        The server URL; its password is masked.
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
