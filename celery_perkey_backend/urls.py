"""Backend URLs: what Celery hands us, what redis-py takes, and what may be shown.

A password never leaves this package unmasked: every error and log line that names a
URL goes through :func:`mask_url`.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit

from .errors import ConfigurationError

__all__ = ["CERT_REQS", "mask_url", "to_redis_url"]

#: Schemes we accept after ``perkey+``, and what redis-py calls them.
_SCHEMES = {
    "perkey": "redis",
    "redis": "redis",
    "rediss": "rediss",
    "unix": "unix",
    "cluster": "cluster",
    "sentinel": "sentinel",
}

#: How Celery spells certificate requirements, mapped to what redis-py takes.
CERT_REQS = {
    "cert_required": "required",
    "cert_optional": "optional",
    "cert_none": "none",
    "required": "required",
    "optional": "optional",
    "none": "none",
}

_SECRET_QUERY_ARGS = {"password", "sentinel_password"}


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
                if value.lower() not in CERT_REQS:
                    raise ConfigurationError(
                        f"result_backend {mask_url(url)!r}: ssl_cert_reqs={value!r} is not one "
                        "of CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE"
                    )
                value = CERT_REQS[value.lower()]
            elif key.startswith("ssl_") and target == "redis":
                raise ConfigurationError(
                    f"result_backend {mask_url(url)!r}: TLS options need perkey+rediss://"
                )
            pairs.append((key, value))
        converted = _unsplit(parts.scheme, parts.netloc, parts.path, urlencode(pairs))
    return converted
