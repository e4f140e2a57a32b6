"""Exceptions raised by the perkey result backend.

Every failure of the store that reaches a Celery user is one of these, never a raw
redis-py exception. They derive from Celery's own ``BackendError`` family so that
existing ``except`` clauses keep working; this is the only module below the Celery
adapter that knows Celery, and only for these base classes.
"""

from __future__ import annotations

from celery.exceptions import BackendError, ImproperlyConfigured

__all__ = [
    "AccessDeniedError",
    "BackendUnavailableError",
    "ConfigurationError",
    "CorruptResultError",
    "CredentialsRefusedError",
    "InvalidIdError",
    "PerkeyError",
    "PoolExhaustedError",
    "ServerFullError",
    "StoreCommandError",
    "quote_id",
]

#: Ids longer than this are shortened where a message quotes them.
ID_QUOTE_LIMIT = 120


def quote_id(ident: object) -> str:
    """``repr`` of an id for a message, shortened if long: a 10 KB id must not put
    20 KB of text into one exception."""
    text = repr(ident)
    if len(text) <= ID_QUOTE_LIMIT:
        return text
    return f"{text[: ID_QUOTE_LIMIT - 20]}...' ({len(str(ident))} characters)"


class PerkeyError(BackendError):  # type: ignore[misc]
    """Base class of every error this package raises at run time."""


class BackendUnavailableError(PerkeyError):
    """The server could not be reached, or the connection broke mid-command.

    These are safe to retry: Celery's ``result_backend_always_retry`` machinery
    retries them, and so does the store's own ``retry_policy``.
    """


class PoolExhaustedError(BackendUnavailableError):
    """Every connection of the client's own pool (``redis_max_connections``) stayed in
    use for as long as the operation could wait. The server may be fine."""


class AccessDeniedError(PerkeyError):
    """The server refused our credentials or rights: a wrong password or user, an ACL
    that denies a command (NOPERM), or a TLS certificate that failed verification.

    Never retried: trying again cannot help, and would look like an outage.
    """


class CredentialsRefusedError(AccessDeniedError):
    """The server would not let us in at all: a wrong or missing password or user, or a
    TLS handshake that failed. Nothing can be read until the settings change."""


class StoreCommandError(PerkeyError):
    """The server refused a command, e.g. a key of ours holds the wrong type."""


class ServerFullError(StoreCommandError):
    """The server is out of memory (``maxmemory`` with ``noeviction``) and refused a
    write. Stores fail with it; waits degrade to reading instead."""


class InvalidIdError(PerkeyError, ValueError):
    """A task or group id that no key can be made of: empty, or not encodable."""


class CorruptResultError(PerkeyError):
    """A key of ours holds something that is not a result this backend can read.

    Parameters
    ----------
    task_id:
        The task whose result is unreadable.
    key:
        The Redis key that holds it.
    reason:
        What is wrong with it.
    """

    def __init__(self, task_id: str, key: str, reason: str) -> None:
        self.task_id = task_id
        self.key = key
        self.reason = reason
        super().__init__(
            f"result of task {quote_id(task_id)} in key {quote_id(key)} is unreadable: {reason}"
        )

    def __reduce__(self) -> tuple[type[CorruptResultError], tuple[str, str, str]]:
        return (type(self), (self.task_id, self.key, self.reason))


class ConfigurationError(PerkeyError, ImproperlyConfigured):  # type: ignore[misc]
    """A setting or the backend URL is wrong; the message names which."""
