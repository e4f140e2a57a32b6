"""Backend URLs: what Celery hands us, what redis-py takes, and what may be shown.

A password never leaves this package unmasked: every error and log line that names a
URL goes through :func:`mask_url`.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit

from .errors import ConfigurationError

__all__ = ["CERT_REQS", "DEFAULT_URL", "display_url", "mask_url", "to_redis_url"]

#: Where a backend built without a URL connects.
DEFAULT_URL = "redis://localhost:6379/0"

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

#: The URLs a user may write, named in the error about any other.
_VALID_FORMS = (
    "perkey://, perkey+redis://, perkey+rediss://, perkey+unix://, perkey+cluster:// "
    "or perkey+sentinel://"
)

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


def display_url(configured: object, url: str | None) -> str:
    """The backend URL as the user wrote it, for messages and ``repr`` (unmasked).

    Celery removes ``perkey+`` before it hands the URL over (``perkey+rediss://h/0``
    arrives as ``rediss://h/0``); the app's ``result_backend`` setting still holds what
    was written. When that setting is not the URL we were given (a backend built by
    hand), the ``perkey+`` form of the URL is shown instead.
    """
    if url is None:
        return "perkey" + DEFAULT_URL.removeprefix("redis")
    if isinstance(configured, str):
        scheme, _, _ = configured.partition("://")
        if configured == url or ("+" in scheme and configured.split("+", 1)[1] == url):
            return configured
    return url if url.partition("://")[0].lower() == "perkey" else f"perkey+{url}"


def to_redis_url(url: str | None, shown: str | None = None) -> str:
    """Turn the URL Celery hands us into one redis-py understands.

    ``perkey://h/0`` arrives unchanged and becomes ``redis://h/0``; ``perkey+rediss://``
    arrives as ``rediss://`` already. Celery spells certificate requirements
    ``CERT_REQUIRED``; redis-py wants ``required``.

    Parameters
    ----------
    shown:
        The URL as the user wrote it (:func:`display_url`), named in errors, masked.

    Raises
    ------
    ConfigurationError
        If the scheme is not one we can connect with.
    """
    if not url:
        return DEFAULT_URL
    named = mask_url(shown or url)
    scheme, sep, rest = url.partition("://")
    target = _SCHEMES.get(scheme.lower())
    if not sep or target is None:
        typed = (shown or url).partition("://")[0]
        raise ConfigurationError(
            f"result_backend {named!r}: unsupported scheme {typed!r}; use {_VALID_FORMS}"
        )
    converted = f"{target}://{rest}"
    parts = urlsplit(converted)
    if parts.query:
        pairs = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key == "ssl_cert_reqs":
                if value.lower() not in CERT_REQS:
                    raise ConfigurationError(
                        f"result_backend {named!r}: ssl_cert_reqs={value!r} is not one "
                        "of CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE"
                    )
                value = CERT_REQS[value.lower()]
            elif key.startswith("ssl_") and target == "redis":
                raise ConfigurationError(
                    f"result_backend {named!r}: TLS options need perkey+rediss://"
                )
            pairs.append((key, value))
        converted = _unsplit(parts.scheme, parts.netloc, parts.path, urlencode(pairs))
    return converted
