"""Exceptions raised by the perkey result backend.

Every failure of the store that reaches a Celery user is one of these, never a raw
redis-py exception. They derive from Celery's own ``BackendError`` family so that
existing ``except`` clauses keep working; this is the only module below the Celery
adapter that knows Celery, and only for these base classes.
"""

from __future__ import annotations

from celery.exceptions import BackendError, ImproperlyConfigured

__all__ = [
    "BackendUnavailableError",
    "ConfigurationError",
    "CorruptResultError",
    "PerkeyError",
    "StoreCommandError",
]


class PerkeyError(BackendError):  # type: ignore[misc]
    """Base class of every error this package raises at run time."""


class BackendUnavailableError(PerkeyError):
    """The server could not be reached, or the connection broke mid-command.

    These are safe to retry: Celery's ``result_backend_always_retry`` machinery
    retries them, and so does the store's own ``retry_policy``.
    """


class StoreCommandError(PerkeyError):
    """The server refused a command, e.g. a key of ours holds the wrong type."""


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
        super().__init__(f"result of task {task_id!r} in key {key!r} is unreadable: {reason}")

    def __reduce__(self) -> tuple[type[CorruptResultError], tuple[str, str, str]]:
        return (type(self), (self.task_id, self.key, self.reason))


class ConfigurationError(PerkeyError, ImproperlyConfigured):  # type: ignore[misc]
    """A setting or the backend URL is wrong; the message names which."""
