"""pytest fixtures for testing your own tasks against this backend, without Docker.

Load them in your root ``conftest.py``::

    pytest_plugins = ["celery_perkey_backend.testing"]

- ``perkey_server``: one throwaway Redis-compatible server for the whole session, on a
  free loopback port (the ``server`` extra's Valkey binary, or ``$PERKEY_SERVER_BIN``).
  A server that cannot start fails the test; it is never skipped.
- ``perkey_url``: its ``perkey://`` URL on database 0.
- ``perkey_broker_url``: a ``redis://`` broker URL on database 1 of the same server.
  Optional, but Redis delivers at once where Celery's ``memory://`` transport polls
  every second.

Both URL fixtures are session-scoped, so that a session-scoped ``celery_config`` (the
form Celery documents), ``celery_session_app`` and ``celery_session_worker`` can use
them. Each test still starts on empty databases: the plugin's autouse fixture
``perkey_empty_databases`` empties the database of each URL fixture a test uses,
however indirectly, before the test. The result database is flushed; the broker
database loses every key but kombu's exchange bindings (``_kombu.binding.*``), which a
worker and a producer that outlive a test route through and do not declare again.

:func:`redirect_app` points a project's own app (tasks declared with ``@app.task``) at
these URLs for a while, and back.

Loading the plugin also registers ``celery.contrib.pytest``, Celery's own fixtures
(``celery_app``, ``celery_worker``, ``celery_config`` …), after pytest-celery's plugin,
so that ``celery_worker`` is Celery's in-process worker even where pytest-celery 1.x is
installed: its own ``celery_worker`` starts Docker containers, and would otherwise
shadow Celery's (pytest-celery issue 442).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from .server import EmbeddedServer

__all__ = [
    "BROKER_DB",
    "PERKEY_DB",
    "perkey_broker_url",
    "perkey_empty_databases",
    "perkey_server",
    "perkey_url",
    "pytest_configure",
    "redirect_app",
]

#: The database ``perkey_url`` points at.
PERKEY_DB = 0

#: The database ``perkey_broker_url`` points at.
BROKER_DB = 1

#: What empties the database of each URL fixture set up, by the fixture's name.
_EMPTY_FOR_EACH_TEST = pytest.StashKey[dict[str, Callable[[], None]]]()

#: kombu's Redis transport keeps the queues bound to an exchange in these sets.
_KOMBU_BINDING = b"_kombu.binding."


@pytest.fixture(scope="session")
def perkey_server() -> Iterator[EmbeddedServer]:
    """A private server for the session; ``.port``, and ``.url`` (``redis://…``) for a
    broker on another database of it."""
    server = EmbeddedServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def perkey_url(request: pytest.FixtureRequest, perkey_server: EmbeddedServer) -> Iterator[str]:
    """``perkey://127.0.0.1:<port>/0`` on the session's server, flushed before each test
    that uses it."""
    with _emptied_for_each_test(request, "perkey_url", lambda: _flush(perkey_server)):
        yield f"perkey://127.0.0.1:{perkey_server.port}/{PERKEY_DB}"


@pytest.fixture(scope="session")
def perkey_broker_url(
    request: pytest.FixtureRequest, perkey_server: EmbeddedServer
) -> Iterator[str]:
    """``redis://127.0.0.1:<port>/1``, a broker on the same server, its messages and queues
    deleted before each test that uses it (kombu's exchange bindings stay)."""
    with _emptied_for_each_test(request, "perkey_broker_url", lambda: _clear_broker(perkey_server)):
        yield f"{perkey_server.url}/{BROKER_DB}"


@pytest.fixture(autouse=True)
def perkey_empty_databases(request: pytest.FixtureRequest) -> None:
    """Before each test, empty the databases of the URL fixtures it uses.

    "Uses" counts every fixture the test depends on, however indirectly (a session-scoped
    ``celery_config`` through ``celery_app``). An autouse fixture runs after the session-
    scoped fixtures the test needs and before its other function-scoped ones
    (``celery_app``, ``celery_worker``). It starts no server: a test that uses no URL
    fixture costs nothing.
    """
    used = set(request.fixturenames)
    for name, empty in request.session.stash.get(_EMPTY_FOR_EACH_TEST, {}).items():
        if name in used:
            empty()


@contextlib.contextmanager
def _emptied_for_each_test(
    request: pytest.FixtureRequest, fixture: str, empty: Callable[[], None]
) -> Iterator[None]:
    """Empty the database of the URL fixture named ``fixture`` now, and register ``empty``
    for every later test that uses it, until the fixture is torn down."""
    empty()
    emptiers = request.session.stash.setdefault(_EMPTY_FOR_EACH_TEST, {})
    emptiers[fixture] = empty
    try:
        yield
    finally:
        emptiers.pop(fixture, None)


def _client(server: EmbeddedServer, db: int) -> redis.Redis:
    return redis.Redis(port=server.port, db=db, socket_timeout=10)


def _flush(server: EmbeddedServer) -> None:
    client = _client(server, PERKEY_DB)
    try:
        client.flushdb()
    finally:
        client.close()


def _clear_broker(server: EmbeddedServer) -> None:
    """Delete every key of the broker database but kombu's exchange bindings.

    A flush would delete the bindings too. A producer declares its queues once per
    connection and a worker once when it starts, so the session's app and worker would
    go on publishing to an exchange bound to nothing: the message is dropped and the
    test waits for it until its timeout.
    """
    client = _client(server, BROKER_DB)
    try:
        doomed = [key for key in client.scan_iter(count=1000) if _KOMBU_BINDING not in key]
        if doomed:
            client.delete(*doomed)
    finally:
        client.close()


#: The settings :func:`redirect_app` replaces; the read and write URLs would otherwise
#: take precedence over ``broker_url``.
_BROKER_SETTINGS = ("broker_url", "broker_read_url", "broker_write_url")

#: Environment variables that Celery reads before ``app.conf``, by the setting they beat.
_ENVIRONMENT = {
    "broker_url": "CELERY_BROKER_URL",
    "broker_read_url": "CELERY_BROKER_READ_URL",
    "broker_write_url": "CELERY_BROKER_WRITE_URL",
    "result_backend": "CELERY_RESULT_BACKEND",
}


@contextlib.contextmanager
def redirect_app(app: Any, *, result_backend: str, broker_url: str | None = None) -> Iterator[Any]:
    """Point ``app`` (your project's own Celery app) at other URLs, and back on exit.

    Sets ``result_backend`` and, if given, ``broker_url`` (clearing ``broker_read_url``
    and ``broker_write_url``) in ``app.conf``, and drops the backend and broker
    connections the app has already made, so that whatever it does next, from any
    thread, goes to the new URLs. On exit it restores the settings and drops the
    connections again. Start the worker inside the block, with
    :func:`celery.contrib.testing.worker.start_worker`.

    Raises
    ------
    ValueError
        If an environment variable that Celery prefers to ``app.conf``
        (``CELERY_RESULT_BACKEND``, ``CELERY_BROKER_URL`` …) is set, or the app's class
        fixes its backend (``backend_cls``): the app would not follow the new URLs.
    """
    settings: dict[str, str | None] = {"result_backend": result_backend}
    if broker_url is not None:
        settings.update(dict.fromkeys(_BROKER_SETTINGS), broker_url=broker_url)
    beaten = [_ENVIRONMENT[key] for key in settings if os.environ.get(_ENVIRONMENT[key])]
    if beaten:
        raise ValueError(
            f"cannot redirect Celery app {app.main!r}: {', '.join(beaten)} set in the "
            "environment takes precedence over app.conf; unset it for the tests "
            "(monkeypatch.delenv)"
        )
    if app.backend_cls is not None:
        raise ValueError(
            f"cannot redirect Celery app {app.main!r}: its class fixes the result backend "
            f"(backend_cls = {app.backend_cls!r}), so result_backend would be ignored"
        )
    saved = {key: app.conf[key] for key in settings}
    app.conf.update(settings)
    _drop_connections(app)
    try:
        yield app
    finally:
        app.conf.update(saved)
        _drop_connections(app)


def _drop_connections(app: Any) -> None:
    """Make ``app`` build its backend and broker pools again from ``app.conf``.

    Celery has no public way to do this. In Celery 5.7 ``app.backend`` is cached in
    ``_backend_cache`` (a thread-safe backend) or per thread in ``_local`` (replaced
    here, so that every thread's copy goes); the broker connection pool is ``_pool``
    and the producer pool ``amqp._producer_pool``, as ``app._after_fork`` resets them.
    """
    app._backend_cache = None
    app._local = threading.local()
    app._pool = None
    amqp = app.__dict__.get("amqp")
    if amqp is not None:
        amqp._producer_pool = None


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
