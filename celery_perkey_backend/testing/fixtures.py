"""pytest fixtures for testing your own tasks against this backend, without Docker.

Load them in your root ``conftest.py``::

    pytest_plugins = ["celery_perkey_backend.testing"]

- ``perkey_server``: one throwaway Redis-compatible server for the whole session, on a
  free loopback port (the ``server`` extra's Valkey binary, or ``$PERKEY_SERVER_BIN``).
  A server that cannot start fails the test; it is never skipped.
- ``perkey_url``: its ``perkey://`` URL on database 0, emptied before each test.
- ``perkey_broker_url``: a ``redis://`` broker URL on database 1 of the same server,
  emptied before each test too. Optional, but Redis delivers at once where Celery's
  ``memory://`` transport polls every second.

Loading the plugin also registers ``celery.contrib.pytest``, Celery's own fixtures
(``celery_app``, ``celery_worker``, ``celery_config`` …), after pytest-celery's plugin,
so that ``celery_worker`` is Celery's in-process worker even where pytest-celery 1.x is
installed: its own ``celery_worker`` starts Docker containers, and would otherwise
shadow Celery's (pytest-celery issue 442).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from .server import EmbeddedServer

__all__ = [
    "BROKER_DB",
    "PERKEY_DB",
    "perkey_broker_url",
    "perkey_server",
    "perkey_url",
    "pytest_configure",
]

#: The database ``perkey_url`` points at.
PERKEY_DB = 0

#: The database ``perkey_broker_url`` points at.
BROKER_DB = 1


@pytest.fixture(scope="session")
def perkey_server() -> Iterator[EmbeddedServer]:
    """A private server for the session; ``.port``, and ``.url`` (``redis://…``) for a
    broker on another database of it."""
    server = EmbeddedServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def perkey_url(perkey_server: EmbeddedServer) -> str:
    """``perkey://127.0.0.1:<port>/0`` on the session's server, its database emptied."""
    _empty(perkey_server, PERKEY_DB)
    return f"perkey://127.0.0.1:{perkey_server.port}/{PERKEY_DB}"


@pytest.fixture
def perkey_broker_url(perkey_server: EmbeddedServer) -> str:
    """``redis://127.0.0.1:<port>/1``, a broker on the same server, its database emptied."""
    _empty(perkey_server, BROKER_DB)
    return f"{perkey_server.url}/{BROKER_DB}"


def _empty(server: EmbeddedServer, db: int) -> None:
    client = redis.Redis(port=server.port, db=db, socket_timeout=10)
    try:
        client.flushdb()
    finally:
        client.close()


def pytest_configure(config: pytest.Config) -> None:
    """Register Celery's fixtures now, after every plugin found by entry point.

    Of two plugins that define one fixture, pytest uses the one registered last; pytest-
    celery's entry point is loaded before any conftest. Registering the module directly
    (rather than through ``pytest_plugins``) also spares a warning about rewriting its
    asserts, since pytest-celery has imported it already.
    """
    import celery.contrib.pytest as celery_fixtures

    if not config.pluginmanager.is_registered(celery_fixtures):
        config.pluginmanager.register(celery_fixtures, "celery.contrib.pytest")
