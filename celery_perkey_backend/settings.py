"""Every setting the backend reads, parsed and checked once, into one frozen object.

:func:`Settings.from_conf` reads the ``perkey_*`` settings and the Celery settings a
Redis user already sets, accepts the same human forms everywhere (``"1h"``, ``"10MB"``,
``"false"``), and raises :class:`ConfigurationError` naming the setting, the value and
the accepted forms when one is wrong, so that a mistake fails when the backend is built
and not at 04:00 when the sweep first runs. Field names carry their units.
"""

from __future__ import annotations

import difflib
import importlib
import ipaddress
import math
import re
import sys
import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, urlencode

from redis.credentials import CredentialProvider

from .errors import ConfigurationError
from .urls import CERT_REQS, display_url, to_redis_url

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_RETRY_POLICY",
    "PERKEY_DEFAULTS",
    "RetrySettings",
    "Settings",
    "parse_count",
    "parse_duration",
    "parse_flag",
    "parse_size",
]

#: Redis refuses strings longer than this; a larger result could never be stored.
REDIS_MAX_BULK = 512 * 1024 * 1024

#: The defaults of the ``perkey_*`` settings (the README's settings table).
PERKEY_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "perkey_key_prefix": "celery-perkey:",
        "perkey_read_once": False,
        "perkey_legacy_fallback": True,
        "perkey_max_result_bytes": REDIS_MAX_BULK,
        "perkey_min_replicas": 0,
        "perkey_min_replicas_timeout": 1.0,
        "perkey_chord_claim_ttl": 60.0,
        "perkey_sweep_max_age": 86400.0,
        "perkey_sweep_delete": False,
        "perkey_sweep_ttl": None,
        "perkey_sweep_scan_count": None,  # the batch size
        "perkey_sweep_batch_size": 200,
        "perkey_sweep_pause": 0.0,
        "perkey_sweep_lock_ttl": 60.0,
        "perkey_sweep_memory_samples": 100,
        "perkey_prometheus_port": None,
        "perkey_prometheus_addr": "0.0.0.0",
        "perkey_prometheus_textfile": None,
        "perkey_prometheus_refresh": 15.0,
        "perkey_multiplex": "auto",
    }
)

#: How long connecting (TCP, TLS and the Redis handshake) may take when
#: ``redis_socket_connect_timeout`` is not set.
DEFAULT_CONNECT_TIMEOUT_S = 5.0

#: Celery's own default ``retry_policy`` of its Redis backend.
DEFAULT_RETRY_POLICY: Mapping[str, Any] = MappingProxyType(
    {"max_retries": 20, "interval_start": 0, "interval_step": 1, "interval_max": 1}
)

_DURATION_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$")
_DURATION_FORMS = "seconds, a timedelta, or text like 500ms, 90s, 30m, 2h, 1d, 1w"

# As in redis.conf: k, m, g are powers of 1000; kb, mb, gb (and KiB, MiB, GiB) of 1024.
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1024**3,
    "gib": 1024**3,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$")
_SIZE_FORMS = "a number of bytes, or text like 512kb, 10MB, 1GiB"

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}
_FLAG_FORMS = "True/False, or text like true, false, yes, no, on, off, 1, 0"


def _bad(name: str, value: Any, forms: str, why: str = "") -> ConfigurationError:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    reason = f" ({why})" if why else ""
    return ConfigurationError(f"{name}={text} is not valid{reason}; use {forms}")


def parse_duration(value: Any, name: str = "duration") -> float:
    """Seconds from a number, a ``timedelta`` or text such as ``"90s"``, ``"2h"``, ``"1d"``.

    Raises
    ------
    ConfigurationError
        If ``value`` is none of those, negative or not finite; the message names ``name``.
    """
    seconds: float | None = None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value.lower())
        if match and match.group(2) in _DURATION_UNITS:
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        elif match and not match.group(2):
            seconds = float(match.group(1))
    if seconds is None or not math.isfinite(seconds):
        raise _bad(name, value, _DURATION_FORMS)
    if seconds < 0:
        raise _bad(name, value, _DURATION_FORMS, "negative")
    return seconds


def parse_size(value: Any, name: str) -> int:
    """Bytes from an integer or text such as ``"512kb"``, ``"10MB"``, ``"1GiB"``.

    Raises
    ------
    ConfigurationError
        If ``value`` is none of those, or not positive.
    """
    size: float | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = float(value)
    elif isinstance(value, str):
        match = _SIZE.match(value.lower())
        if match and match.group(2) in _SIZE_UNITS:
            size = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if size is None:
        raise _bad(name, value, _SIZE_FORMS)
    if size < 1:
        raise _bad(name, value, _SIZE_FORMS, "must be at least 1 byte")
    return int(size)


def parse_flag(value: Any, name: str) -> bool:
    """A boolean from a bool, 0/1, or the words Celery's own settings accept.

    ``"false"``, ``"0"`` and ``"no"`` are false, as they are for settings that come
    from environment variables.

    Raises
    ------
    ConfigurationError
        If ``value`` is none of those.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise _bad(name, value, _FLAG_FORMS)


def parse_count(value: Any, name: str, minimum: int = 0) -> int:
    """A whole number of at least ``minimum``, from an int or its decimal text.

    Raises
    ------
    ConfigurationError
        If ``value`` is not a whole number, or below ``minimum``.
    """
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    forms = f"a whole number of at least {minimum}"
    if number is None:
        raise _bad(name, value, forms)
    if number < minimum:
        raise _bad(name, value, forms, "too small")
    return number


def _auto_or_flag(value: Any, name: str) -> bool | None:
    """``None`` for ``"auto"``, else a boolean."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        return parse_flag(value, name)
    except ConfigurationError:
        raise _bad(name, value, '"auto", True or False') from None


def _expiry(value: Any, name: str) -> float | None:
    """A TTL in seconds; ``None`` (or 0) means no TTL, as in Celery."""
    if value is None:
        return None
    seconds = parse_duration(value, name)
    return seconds or None


def _positive_duration(value: Any, name: str) -> float:
    seconds = parse_duration(value, name)
    if seconds <= 0:
        raise _bad(name, value, _DURATION_FORMS, "must be more than 0")
    return seconds


def _optional_duration(value: Any, name: str) -> float | None:
    return None if value is None else parse_duration(value, name)


@dataclass(frozen=True)
class RetrySettings:
    """How failed commands are retried: one policy for stores, waits and chords.

    With ``exponential`` (Celery's ``result_backend_always_retry``), the pause before
    retry ``n`` is random between 0 and ``min(max_pause_s, first_pause_s * 2**n)``;
    otherwise it grows linearly from ``first_pause_s`` by ``pause_step_s`` up to
    ``max_pause_s``, as ``retry_policy`` does in Celery's Redis backend.
    """

    max_retries: int | None
    first_pause_s: float
    pause_step_s: float
    max_pause_s: float
    exponential: bool = False


@dataclass(frozen=True)
class Settings:
    """Everything the backend reads from ``app.conf``, parsed and checked.

    Build it with :meth:`from_conf`; every field is final. Durations are seconds
    (``_s``) or milliseconds (``_ms``) as their names say; an expiry of ``None`` means
    no TTL. ``url`` is the backend URL as the user wrote it (``perkey+rediss://…``),
    the one every message names (masked); ``redis_url`` is what redis-py connects to.
    """

    url: str = field(repr=False)  # secrets: shown only through urls.mask_url
    redis_url: str = field(repr=False)
    key_prefix: str
    legacy_prefix: str
    legacy_group_prefix: str
    result_expires_s: float | None
    failure_expires_s: float | None
    chord_expires_s: float | None
    chord_join_timeout_s: float
    chord_ordered: bool
    chord_claim_ttl_s: float
    read_once: bool
    legacy_fallback: bool
    max_result_bytes: int
    min_replicas: int
    min_replicas_timeout_ms: int
    retry: RetrySettings
    sweep_max_age_s: float
    sweep_delete: bool
    sweep_ttl_s: float
    sweep_scan_count: int | None  # None: the sweep's batch size
    sweep_batch_size: int
    sweep_pause_s: float
    sweep_lock_ttl_s: float
    sweep_memory_samples: int
    prometheus_port: int | None
    prometheus_addr: str
    prometheus_textfile: str | None
    prometheus_refresh_s: float
    multiplex: bool | None
    socket_timeout_s: float | None
    connection_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    transport_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    #: Errors retried like a lost connection besides redis-py's own (the transport
    #: option ``additional_connection_errors``).
    connection_errors: tuple[type[Exception], ...] = ()

    @property
    def credential_provider(self) -> CredentialProvider | None:
        """The provider every connection asks for its username and password, if any."""
        provider: CredentialProvider | None = self.connection_options.get("credential_provider")
        return provider

    @property
    def chord_result_expires_s(self) -> float | None:
        """How long a chord's header results and saved group live.

        They are read by users too, so never for less than ``result_expires``; no
        expiry when either is unset, as in Celery.
        """
        if not self.chord_expires_s or not self.result_expires_s:
            return None
        return max(self.chord_expires_s, self.result_expires_s)

    @property
    def multiplexed(self) -> bool:
        """Whether plain waits go through the process's multiplexer: as set, or with
        ``"auto"``, when gevent or eventlet has patched the process."""
        if self.multiplex is not None:
            return self.multiplex
        gevent = sys.modules.get("gevent.monkey")
        if gevent is not None and gevent.is_module_patched("socket"):
            return True
        eventlet = sys.modules.get("eventlet.patcher")
        return eventlet is not None and bool(eventlet.is_monkey_patched("socket"))

    @property
    def is_cluster(self) -> bool:
        return self.redis_url.startswith("cluster://")

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any], url: str | None) -> Settings:
        """Read and check every setting.

        Parameters
        ----------
        conf:
            ``app.conf`` (any mapping with Celery's setting names).
        url:
            The backend URL as Celery hands it over.

        Raises
        ------
        ConfigurationError
            Naming the first setting that is wrong, its value and the accepted forms.
        """
        _reject_unknown(conf)
        _refuse_unread(conf)

        def own(name: str) -> Any:
            value = conf.get(name)
            return PERKEY_DEFAULTS[name] if value is None else value

        shown = display_url(conf.get("result_backend"), url)
        redis_url, from_url = _take_query_arg(to_redis_url(url, shown), "credential_provider")
        transport = conf.get("result_backend_transport_options") or {}
        if not isinstance(transport, Mapping):
            raise _bad("result_backend_transport_options", transport, "a dict")
        global_prefix = str(transport.get("global_keyprefix") or "")
        if global_prefix and global_prefix[-1] not in ":_-.":
            global_prefix += "_"
        key_prefix = global_prefix + str(own("perkey_key_prefix"))
        if redis_url.startswith("cluster://") and {"{", "}"} & set(key_prefix):
            raise ConfigurationError(
                f"key prefix {key_prefix!r} holds a brace: on a cluster it would "
                "replace each key's hash tag; remove it from global_keyprefix/perkey_key_prefix"
            )
        expires = _expiry(conf.get("result_expires"), "result_expires")
        failure = conf.get("result_failure_expires")
        chord = conf.get("result_chord_expires")
        ordered = transport.get("result_chord_ordered", conf.get("result_chord_ordered", True))
        expires_default = expires if expires else 86400.0
        sweep_ttl = own("perkey_sweep_ttl")
        scan_count = own("perkey_sweep_scan_count")
        textfile = own("perkey_prometheus_textfile")
        port = own("perkey_prometheus_port")
        if textfile or port:
            _require_prometheus(
                "perkey_prometheus_textfile" if textfile else "perkey_prometheus_port"
            )
        connection, socket_timeout = _connection_options(conf)
        provider = (
            _credential_provider(from_url, "result_backend URL argument credential_provider")
            if from_url
            else _credential_provider(
                conf.get("redis_backend_credential_provider"), "redis_backend_credential_provider"
            )
        )
        if provider is not None:
            _no_password_beside(provider, connection, redis_url)
            connection["credential_provider"] = provider
        return cls(
            url=shown,
            redis_url=redis_url,
            key_prefix=key_prefix,
            legacy_prefix=global_prefix + "celery-task-meta-",
            legacy_group_prefix=global_prefix + "celery-taskset-meta-",
            result_expires_s=expires,
            failure_expires_s=expires
            if failure is None
            else _expiry(failure, "result_failure_expires"),
            chord_expires_s=expires if chord is None else _expiry(chord, "result_chord_expires"),
            chord_join_timeout_s=parse_duration(
                conf.get("result_chord_join_timeout") or 5.0, "result_chord_join_timeout"
            ),
            chord_ordered=parse_flag(ordered, "result_chord_ordered"),
            chord_claim_ttl_s=_positive_duration(
                own("perkey_chord_claim_ttl"), "perkey_chord_claim_ttl"
            ),
            read_once=parse_flag(own("perkey_read_once"), "perkey_read_once"),
            legacy_fallback=parse_flag(own("perkey_legacy_fallback"), "perkey_legacy_fallback"),
            max_result_bytes=min(
                parse_size(own("perkey_max_result_bytes"), "perkey_max_result_bytes"),
                REDIS_MAX_BULK,
            ),
            min_replicas=parse_count(own("perkey_min_replicas"), "perkey_min_replicas"),
            min_replicas_timeout_ms=round(
                parse_duration(own("perkey_min_replicas_timeout"), "perkey_min_replicas_timeout")
                * 1000
            ),
            retry=_retry(conf, transport),
            sweep_max_age_s=parse_duration(own("perkey_sweep_max_age"), "perkey_sweep_max_age"),
            sweep_delete=parse_flag(own("perkey_sweep_delete"), "perkey_sweep_delete"),
            sweep_ttl_s=parse_duration(sweep_ttl, "perkey_sweep_ttl")
            if sweep_ttl
            else expires_default,
            sweep_scan_count=None
            if scan_count is None
            else parse_count(scan_count, "perkey_sweep_scan_count", 1),
            sweep_batch_size=parse_count(
                own("perkey_sweep_batch_size"), "perkey_sweep_batch_size", 1
            ),
            sweep_pause_s=parse_duration(own("perkey_sweep_pause"), "perkey_sweep_pause"),
            sweep_lock_ttl_s=parse_duration(own("perkey_sweep_lock_ttl"), "perkey_sweep_lock_ttl"),
            sweep_memory_samples=parse_count(
                own("perkey_sweep_memory_samples"), "perkey_sweep_memory_samples"
            ),
            prometheus_port=None
            if port is None
            else parse_count(port, "perkey_prometheus_port", 1),
            prometheus_addr=_listen_address(
                own("perkey_prometheus_addr"), "perkey_prometheus_addr"
            ),
            prometheus_textfile=None if textfile is None else str(textfile),
            prometheus_refresh_s=max(
                0.1, parse_duration(own("perkey_prometheus_refresh"), "perkey_prometheus_refresh")
            ),
            multiplex=_auto_or_flag(own("perkey_multiplex"), "perkey_multiplex"),
            socket_timeout_s=socket_timeout,
            connection_options=MappingProxyType(connection),
            transport_options=MappingProxyType(dict(transport)),
            connection_errors=_connection_errors(transport.get("additional_connection_errors")),
        )


#: A host name: dot-separated labels of letters, digits and inner hyphens.
_HOST_NAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")


def _listen_address(value: Any, name: str) -> str:
    """An address to listen on: an IPv4 or IPv6 address (``[::1]`` or ``::1``), or a
    host name; ``0.0.0.0`` (or ``::``) is every interface."""
    text = value.strip() if isinstance(value, str) else ""
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        # A name's last label is never all digits: 256.1.1.1 is a bad address, no name.
        last = bare.rstrip(".").rpartition(".")[2]
        if bare == text and len(bare) <= 253 and _HOST_NAME.match(bare) and not last.isdigit():
            return bare
    raise _bad(
        name,
        value,
        "an IP address of this host (0.0.0.0 for all interfaces, 127.0.0.1, ::) or a host name",
    )


#: Settings of Celery's Redis backend this backend does not read, and why.
_NOT_READ = {
    "redis_host": "the host comes from the result_backend URL (perkey://host:port/db)",
    "redis_port": "the port comes from the result_backend URL (perkey://host:port/db)",
    "redis_db": "the database comes from the result_backend URL (perkey://host:port/db)",
}


def _refuse_unread(conf: Mapping[str, Any]) -> None:
    """A Celery Redis-backend setting that is set here but not read: refuse it, saying
    where its value goes instead, rather than ignore it."""
    for name, why in _NOT_READ.items():
        if conf.get(name) is not None:
            raise ConfigurationError(f"{name}={conf[name]!r} is not read: {why}; remove it")


def _require_prometheus(setting: str) -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            f"{setting} is set, but prometheus_client is not installed; "
            "pip install 'celery-perkey-backend[prometheus]'"
        ) from None


def _reject_unknown(conf: Mapping[str, Any]) -> None:
    """A setting of ours that Celery would not hand over keeps its default: refuse it.

    That is a misspelt name (``perkey_read_onec``), and a right name in a form this
    configuration does not read: with ``config_from_object(..., namespace="CELERY")``
    (Django) Celery reads ``CELERY_PERKEY_READ_ONCE``, and without a namespace only
    ``perkey_read_once``, so ``PERKEY_READ_ONCE`` would be ignored in both.
    """
    # Celery's settings object knows its namespace (``"CELERY_"``); a plain mapping has none.
    prefix = getattr(conf, "prefix", None) or ""
    for name in list(conf):
        if not isinstance(name, str):
            continue
        bare = name.lower()
        if prefix and bare.startswith(prefix.lower()):
            bare = bare[len(prefix) :]
        if not bare.startswith("perkey_"):
            continue
        if bare not in PERKEY_DEFAULTS:
            close = difflib.get_close_matches(bare, list(PERKEY_DEFAULTS), n=1)
            hint = f"; did you mean {_spelt(close[0], prefix, name)!r}?" if close else ""
            raise ConfigurationError(f"unknown setting {name!r}{hint}")
        if conf.get(bare) is None and conf.get(name) is not None:
            raise ConfigurationError(
                f"setting {name!r} is not read in this form; write it as "
                f"{_spelt(bare, prefix, name)!r}"
            )


def _spelt(setting: str, prefix: str, written: str) -> str:
    """``setting`` in the form this configuration reads, close to how it was written.

    Under a namespace (``"CELERY_"``) that is ``CELERY_PERKEY_…``, unless the name was
    written in lower case without it (``app.conf.perkey_…``), which Celery reads too.
    """
    if prefix and (written.lower().startswith(prefix.lower()) or not written.islower()):
        return prefix + (setting.upper() if prefix.isupper() else setting)
    return setting


def _retry(conf: Mapping[str, Any], transport: Mapping[str, Any]) -> RetrySettings:
    """The one retry policy: Celery's always-retry settings when they are on, else
    ``retry_policy`` from the transport options (Celery's Redis backend's defaults)."""
    if parse_flag(conf.get("result_backend_always_retry") or False, "result_backend_always_retry"):
        limit = conf.get("result_backend_max_retries")
        base_ms = conf.get("result_backend_base_sleep_between_retries_ms")
        max_ms = conf.get("result_backend_max_sleep_between_retries_ms")
        return RetrySettings(
            max_retries=None
            if limit is None or limit == float("inf")
            else parse_count(limit, "result_backend_max_retries"),
            first_pause_s=parse_duration(
                10 if base_ms is None else base_ms,
                "result_backend_base_sleep_between_retries_ms",
            )
            / 1000,
            pause_step_s=0.0,
            max_pause_s=parse_duration(
                10000 if max_ms is None else max_ms,
                "result_backend_max_sleep_between_retries_ms",
            )
            / 1000,
            exponential=True,
        )
    given = transport.get("retry_policy") or {}
    if not isinstance(given, Mapping):
        raise _bad("retry_policy", given, "a dict of max_retries and interval_*")
    unknown = set(given) - set(DEFAULT_RETRY_POLICY)
    if unknown:
        raise ConfigurationError(
            f"retry_policy has unknown key(s) {sorted(unknown)}; use {list(DEFAULT_RETRY_POLICY)}"
        )
    policy = {**DEFAULT_RETRY_POLICY, **given}
    limit = policy["max_retries"]
    return RetrySettings(
        max_retries=None if limit is None else parse_count(limit, "retry_policy.max_retries"),
        first_pause_s=parse_duration(policy["interval_start"], "retry_policy.interval_start"),
        pause_step_s=parse_duration(policy["interval_step"], "retry_policy.interval_step"),
        max_pause_s=parse_duration(policy["interval_max"], "retry_policy.interval_max"),
    )


#: Celery settings passed to redis-py when set, the redis-py option each becomes, and
#: how each is read.
_PASSED_ON: dict[str, tuple[str, Callable[[Any, str], Any]]] = {
    "redis_backend_health_check_interval": ("health_check_interval", parse_duration),
    "redis_client_name": ("client_name", lambda value, name: str(value)),
    "redis_socket_keepalive": ("socket_keepalive", parse_flag),
    "redis_username": ("username", lambda value, name: str(value)),
    "redis_password": ("password", lambda value, name: str(value)),
}


def _connection_options(conf: Mapping[str, Any]) -> tuple[dict[str, Any], float | None]:
    """redis-py connection options from the ``redis_*`` settings, and the socket timeout.

    Values in the URL's query string win over these, as they do in Celery.
    """
    socket_timeout = _optional_duration(conf.get("redis_socket_timeout"), "redis_socket_timeout")
    connect_timeout = _optional_duration(
        conf.get("redis_socket_connect_timeout"), "redis_socket_connect_timeout"
    )
    if connect_timeout is None:
        # redis-py would wait the whole socket timeout (120 s in Celery) to connect.
        connect_timeout = min(
            DEFAULT_CONNECT_TIMEOUT_S, socket_timeout or DEFAULT_CONNECT_TIMEOUT_S
        )
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
    }
    limit = conf.get("redis_max_connections")
    if limit:
        options["max_connections"] = parse_count(limit, "redis_max_connections", 1)
    if conf.get("redis_retry_on_timeout") is not None:
        # Read for its errors only: timeouts are always retried by the one policy.
        parse_flag(conf["redis_retry_on_timeout"], "redis_retry_on_timeout")
    for setting, (option, parse) in _PASSED_ON.items():
        if conf.get(setting):
            options[option] = parse(conf[setting], setting)
    ssl = conf.get("redis_backend_use_ssl")
    if ssl:
        if not isinstance(ssl, Mapping):
            raise _bad("redis_backend_use_ssl", ssl, "a dict of ssl_* options")
        options.update(ssl)
        reqs = options.get("ssl_cert_reqs")
        if isinstance(reqs, str):
            options["ssl_cert_reqs"] = CERT_REQS.get(reqs.lower(), reqs)
        options["ssl"] = True
    return options, socket_timeout


def _imported(path: str) -> Any:
    """What a dotted path names, as Celery's ``symbol_by_name`` reads it:
    ``package.module.Name`` or ``package.module:Name``.

    Raises
    ------
    ImportError, AttributeError, ValueError
        If the module or the name is not there, or the path has no module part.
    """
    module, sep, attribute = path.partition(":")
    if not sep:
        module, _, attribute = path.rpartition(".")
    if not module or not attribute:
        raise ValueError("not a dotted path to a name in a module")
    found: Any = importlib.import_module(module)
    for part in attribute.split("."):
        found = getattr(found, part)
    return found


#: The accepted forms of a credential provider, named when one is wrong.
_PROVIDER_FORMS = (
    "a redis.credentials.CredentialProvider instance, its class, or the dotted path of "
    "the class (e.g. 'myproject.auth.IAMProvider')"
)

#: Providers made from a class or a dotted path, one per class or path in the process:
#: every backend of the process then shares one provider, and so one client pool.
_made_providers: dict[Hashable, CredentialProvider] = {}
_made_lock = threading.Lock()


def _credential_provider(value: Any, name: str) -> CredentialProvider | None:
    """The provider ``redis_backend_credential_provider`` (or the URL argument) names.

    As in Celery: a dotted path is imported and called with no arguments; an instance is
    used as it is. A class is called with no arguments too. The one made from a path or
    a class is made once per process.

    Raises
    ------
    ConfigurationError
        If the path cannot be imported, or what it names (or the value) is not a
        ``CredentialProvider``, or making one failed.
    """
    if value is None or value == "":
        return None
    if isinstance(value, CredentialProvider):
        return value
    if not isinstance(value, str | type):
        raise _bad(name, value, _PROVIDER_FORMS)
    with _made_lock:
        made = _made_providers.get(value)
        if made is not None:
            return made
        target: Any = value
        if isinstance(value, str):
            try:
                target = _imported(value)
            except (ImportError, AttributeError, ValueError) as exc:
                raise _bad(name, value, _PROVIDER_FORMS, f"cannot import it: {exc}") from None
        if isinstance(target, CredentialProvider):
            made = target
        elif isinstance(target, type) and issubclass(target, CredentialProvider):
            try:
                made = target()
            except Exception as exc:  # the user's own constructor
                why = f"{target.__qualname__}() failed: {type(exc).__name__}: {exc}"
                raise _bad(name, value, _PROVIDER_FORMS, why) from None
        else:
            raise _bad(name, value, _PROVIDER_FORMS, f"{target!r} is not a CredentialProvider")
        _made_providers[value] = made
        return made


#: A username or password in the URL: ``scheme://user:password@host``.
_USERINFO = re.compile(r"://[^/?#@]*@")


def _no_password_beside(
    provider: CredentialProvider, options: Mapping[str, Any], redis_url: str
) -> None:
    """Refuse a username or password given beside a credential provider.

    redis-py refuses both together; Celery drops the username and password silently.
    Here the one that would never be used is named, so it can be removed.
    """
    given = [name for name in ("username", "password") if options.get(name)]
    if given:
        settings = " and ".join(f"redis_{name}" for name in given)
        raise ConfigurationError(
            f"{settings} and redis_backend_credential_provider are both set; the provider "
            f"({type(provider).__qualname__}) gives the username and password: remove {settings}"
        )
    if _USERINFO.search(redis_url):
        raise ConfigurationError(
            "result_backend holds a username or password, and a credential provider "
            f"({type(provider).__qualname__}) is set, which gives them: remove them from the URL"
        )


def _take_query_arg(url: str, name: str) -> tuple[str, str | None]:
    """``url`` without its query argument ``name``, and that argument's value."""
    base, sep, query = url.partition("?")
    if not sep:
        return url, None
    pairs = parse_qsl(query, keep_blank_values=True)
    found = [value for key, value in pairs if key == name]
    if not found:
        return url, None
    rest = urlencode([(key, value) for key, value in pairs if key != name])
    return (f"{base}?{rest}" if rest else base), found[-1]


_ERRORS_FORMS = "an exception class, its dotted path, or a list of them"


def _connection_errors(value: Any) -> tuple[type[Exception], ...]:
    """The classes of ``additional_connection_errors`` (a transport option).

    Celery takes a class, a dotted path or a list of them, and logs and skips an entry
    it cannot use; here such an entry fails instead, naming it.

    Raises
    ------
    ConfigurationError
        If an entry cannot be imported or is not an exception class.
    """
    name = "result_backend_transport_options['additional_connection_errors']"
    if value is None:
        return ()
    entries = [value] if isinstance(value, str | type) else value
    try:
        entries = list(entries)
    except TypeError:
        raise _bad(name, value, _ERRORS_FORMS) from None
    found: list[type[Exception]] = []
    for entry in entries:
        target = entry
        if isinstance(entry, str):
            try:
                target = _imported(entry)
            except (ImportError, AttributeError, ValueError) as exc:
                raise _bad(name, entry, _ERRORS_FORMS, f"cannot import it: {exc}") from None
        if not (isinstance(target, type) and issubclass(target, Exception)):
            raise _bad(name, entry, _ERRORS_FORMS, "not an exception class")
        found.append(target)
    return tuple(found)
