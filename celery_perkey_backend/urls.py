"""Backend URLs: what Celery hands us, what redis-py takes, and what may be shown.

A password never leaves this package unmasked: every error and log line that names a
URL goes through :func:`mask_url`.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from .errors import ConfigurationError

__all__ = [
    "CERT_REQS",
    "DEFAULT_URL",
    "MASK",
    "display_url",
    "mask_url",
    "redact",
    "secrets_of",
    "to_redis_url",
]

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

#: A query argument whose name holds one of these carries a secret: redis-py passes any
#: argument it does not parse on to the connection (``password``, ``ssl_password``,
#: Celery's ``sentinel_password``...).
_SECRET_ARG_WORDS = ("password", "passwd", "secret", "token", "credential")

#: The shown stand-in of a secret.
MASK = "**"

#: What separates the nodes of a URL, by scheme (as ``connection`` reads them).
_NODE_SEPARATORS = {"sentinel": ";", "cluster": ","}

# The grammar below reads one node of a URL: an optional scheme (each ``sentinel://``
# of Celery's multi-Sentinel form repeats it), optional userinfo, a host (a name, an
# address, ``[v6]``, or nothing before a socket path) and a port; then a path, a query
# and the next node or the end. A password may hold any of ``/ ? # @ : ; ,`` unencoded,
# so the userinfo is the shortest text before an ``@`` after which the rest reads
# well: a path never holds an ``@``, nor does a query argument's name. A userinfo never
# holds ``://`` (that would take in the next node's scheme), and a user (before the
# first ``:``) holds no ``/ ? #``: ``h/0?password=x@y`` is a host and a query.
_USERINFO = r"(?P<userinfo>[^:/?#]*?(?::(?:(?!://).)*?)?)@"
_HOST = r"(?P<host>(?:\[[^\]@/]*\]|[^\[\]/?#@;,:\s]*)(?::[0-9]*)?)"


def _node_pattern(sep: str, userinfo_first: bool) -> re.Pattern[str]:
    """One node, then (looking ahead) a path, a query, and ``sep`` or the end; read
    with userinfo where that reads well, or only where it must."""
    not_sep = re.escape(sep)
    path = rf"(?:[/#][^@?{not_sep}]*)?"
    pair = rf"(?:[^=&@]*=[^&]*|[^=&@{not_sep}]*)"
    query = rf"(?:\?{pair}(?:&{pair})*)?"
    after = rf"(?:{re.escape(sep)}|$)" if sep else "$"
    return re.compile(
        rf"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)?(?:{_USERINFO}){'?' if userinfo_first else '??'}"
        rf"{_HOST}(?={path}{query}{after})",
        re.DOTALL,
    )


_NODES = {
    (sep, first): _node_pattern(sep, first)
    for sep in ("", *_NODE_SEPARATORS.values())
    for first in (True, False)
}

# A secret query argument, and its value up to the next ``&`` (an unencoded ``;``,
# ``,`` or ``#`` in it is taken as part of it).
_SECRET_ARG = re.compile(
    r"(?<=[?&])[^=&]*(?:" + "|".join(_SECRET_ARG_WORDS) + r")[^=&]*=(?P<value>[^&]*)",
    re.IGNORECASE,
)

#: Characters that split a URL: a secret's pieces between them are redacted too.
_URL_SEPARATORS = re.compile(r"[/?#@:;,&=%\[\]]")


def mask_url(url: str) -> str:
    """Return ``url`` with every secret replaced by ``**``, for messages and logs.

    Every URL form the backend takes: one host or many (Celery's
    ``sentinel://:pw@h:1;sentinel://:pw@h:2/0``, ``cluster://:pw@h1:1,:pw@h2:2/0``),
    ``user:password@`` and ``:password@`` (each node's), passwords holding unencoded
    ``/ ? # @ : ; ,``, and secret query arguments (``?password=``,
    ``sentinel_password=``, ``ssl_password=``...). Hosts, ports, users, the database
    and other arguments stay as written. Where a URL cannot be read as one of these
    forms, everything after its scheme is masked: more is hidden, never less.
    """
    return "".join(_masked(url)[0])


def secrets_of(url: str) -> list[str]:
    """Every secret :func:`mask_url` hides in ``url``, as written and decoded."""
    found: dict[str, None] = {}
    for secret in _masked(url)[1]:
        found.update(dict.fromkeys((secret, unquote(secret))))
    return [secret for secret in found if secret]


def redact(text: str, *urls: str) -> str:
    """``text`` (an error's message) without any of the secrets of ``urls``.

    The text of an error that redis-py or the standard library raised about a URL may
    quote a piece of it (``Port could not be cast to integer value as 'pa'``, for a
    password ``pa/ss`` that the URL parser took for a host and a path). Each secret, and
    each of its pieces between the characters that split a URL, is replaced by ``**``.
    """
    pieces: set[str] = set()
    for secret in (secret for url in urls for secret in secrets_of(url)):
        pieces.add(secret)
        pieces.update(piece for piece in _URL_SEPARATORS.split(secret) if len(piece) > 1)
    for piece in sorted(pieces, key=len, reverse=True):
        text = text.replace(piece, MASK)
    return text


def _masked(url: str) -> tuple[list[str], list[str]]:
    """The pieces of the masked ``url``, and the secrets it leaves out.

    A URL may read two ways: ``h:1/0?password=x@y`` is a host and a query, or a user
    ``h`` with a password ``1/0?password=x`` at host ``y``. It is read with userinfo
    wherever that reads well, and again only where it must; when the two readings
    disagree on its secrets, everything after the scheme is hidden.
    """
    shown, secrets = _read(url, userinfo_first=True)
    other = _read(url, userinfo_first=False)[1]
    if other == secrets:
        return shown, secrets
    scheme, has_scheme, rest = url.partition("://")
    return [scheme + has_scheme if has_scheme else "", MASK], [rest or url, *secrets, *other]


def _read(url: str, userinfo_first: bool) -> tuple[list[str], list[str]]:
    """The pieces of the masked ``url``, and the secrets it leaves out, read one way."""
    shown: list[str] = []
    secrets: list[str] = []
    scheme, has_scheme, _ = url.partition("://")
    sep = _NODE_SEPARATORS.get(scheme.rpartition("+")[2].lower(), "") if has_scheme else ""
    pattern = _NODES[sep, userinfo_first]
    pos, end = 0, len(url)
    while True:
        node = pattern.match(url, pos)
        if node is None or (pos == 0 and has_scheme and node.group("scheme") is None):
            # Not a form we know: hide everything after the scheme.
            start = len(scheme) + 3 if has_scheme and pos == 0 else pos
            shown += [url[pos:start], MASK] if start < end else [url[pos:]]
            secrets.append(url[start:])
            return shown, secrets
        shown.append(node.group("scheme") or "")
        userinfo = node.group("userinfo")
        if userinfo is not None:
            user, colon, password = userinfo.partition(":")
            shown.append(f"{user}:{MASK}@" if colon else f"{userinfo}@")
            secrets.append(password)
        shown.append(node.group("host"))
        pos = node.end()
        if pos < end and url[pos] == sep:
            shown.append(sep)
            pos += 1
            continue
        # The path and the query, with secret arguments masked, up to the next node.
        while pos < end:
            cut = url.find(sep, pos) if sep else -1
            stop = end if cut == -1 else cut
            arg = _SECRET_ARG.search(url, pos, stop)
            if arg is None:
                shown.append(url[pos:stop])
                pos = stop
                break
            # The value runs to the next "&", past any separator.
            value = arg.start("value")
            amp = url.find("&", value)
            shown.append(url[pos:value] + MASK)
            pos = end if amp == -1 else amp
            secrets.append(url[value:pos])
        if pos == end:
            return shown, secrets
        shown.append(sep)
        pos += 1


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
        If the scheme is not one we can connect with, or a port or a database (of any
        node) is not a number.
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
    _check_numbers(converted, target, named, shown or url)
    return converted


def _check_numbers(converted: str, target: str, named: str, written: str) -> None:
    """Refuse a port or a database that is not a number, in every node of the URL.

    redis-py would take a database ``/abc`` for database 0, and finds a bad port only
    when it first connects; Celery's ``redis://`` backend refuses both as it is built.

    Raises
    ------
    ConfigurationError
        Naming the masked URL and the value (redacted of the URL's secrets).
    """
    sep = _NODE_SEPARATORS.get(target, "")
    for node in converted.split(sep) if sep else [converted]:
        if "://" not in node:
            node = f"{target}://{node}"
        parts = urlsplit(node)
        if target != "unix":
            try:
                parts.port  # noqa: B018 (it raises for a port that is not one)
            except ValueError:
                port = parts.netloc.rpartition("@")[2].rpartition(":")[2]
                raise ConfigurationError(
                    f"result_backend {named!r}: the port {redact(repr(port), written)} is "
                    "not a number from 0 to 65535"
                ) from None
            db = unquote(parts.path).strip("/")
            if db and not (db.isascii() and db.isdigit()):
                raise ConfigurationError(
                    f"result_backend {named!r}: the database {redact(repr(db), written)} "
                    "is not a number; write it as the path, e.g. /0"
                )
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key == "db" and not (value.isascii() and value.isdigit()):
                raise ConfigurationError(
                    f"result_backend {named!r}: db={redact(repr(value), written)} is not a number"
                )
