"""A Celery result backend that keeps each task's result in its own expiring Redis
list and waits on it with a blocking list command, never pub/sub or polling.

Configure it with ``result_backend = "perkey://host:6379/0"``.
"""

from .backend import PerkeyBackend
from .errors import (
    AccessDeniedError,
    BackendUnavailableError,
    ConfigurationError,
    CorruptResultError,
    CredentialsRefusedError,
    InvalidIdError,
    PerkeyError,
    PoolExhaustedError,
    ServerFullError,
    StoreCommandError,
)

__all__ = [
    "AccessDeniedError",
    "BackendUnavailableError",
    "ConfigurationError",
    "CorruptResultError",
    "CredentialsRefusedError",
    "InvalidIdError",
    "PerkeyBackend",
    "PerkeyError",
    "PoolExhaustedError",
    "ServerFullError",
    "StoreCommandError",
]

__version__ = "0.1.0"
