"""Deadlines and the blocking list commands that waits are made of.

A wait is a series of blocking commands, each shorter than the socket timeout, so a
long wait never trips redis-py's read timeout (which Celery would log as a lost
connection). Deadlines are kept on the client's monotonic clock as well, because the
server rounds blocking timeouts to its own clock tick.
"""

from __future__ import annotations

import time
from typing import Any, cast

import redis

from .connection import node_client

__all__ = [
    "MAX_BLOCK",
    "MIN_BLOCK",
    "READ_MARGIN",
    "Deadline",
    "ListBlocker",
    "block_cap",
    "blocking_call",
]

#: The longest single blocking command. Long waits are made of several, so that a dead
#: connection is noticed and parent failures of a chain are re-checked between them.
MAX_BLOCK = 10.0

#: The shortest one: a blocking timeout of 0 means "forever" to the server.
MIN_BLOCK = 0.01

#: How much longer than a block its reply may take (the server's clock tick, a busy
#: machine) before the connection counts as dead.
READ_MARGIN = 0.5


def block_cap(socket_timeout: float | None) -> float:
    """The longest block that stays safely below the socket timeout.

    The margin covers the server's clock tick (up to 100 ms at the default hz) and a
    busy client or server.
    """
    if socket_timeout is None:
        return MAX_BLOCK
    margin = max(0.25, socket_timeout * 0.2)
    return max(MIN_BLOCK, min(MAX_BLOCK, socket_timeout - margin))


class Deadline:
    """An overall deadline shared by every command of one wait.

    Parameters
    ----------
    timeout:
        Seconds from now, or ``None`` to wait forever.
    """

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._end = None if timeout is None else time.monotonic() + max(timeout, 0.0)

    def remaining(self) -> float | None:
        """Seconds left, never negative; ``None`` when there is no deadline."""
        if self._end is None:
            return None
        return max(self._end - time.monotonic(), 0.0)

    @property
    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0.0

    def block_for(self, cap: float) -> float:
        """How long the next blocking command may block: at most ``cap``."""
        left = self.remaining()
        if left is None:
            return cap
        return max(MIN_BLOCK, min(cap, left))


def blocking_call(client: redis.Redis, key: str, seconds: float, *args: Any) -> Any:
    """Run one blocking command whose reply may take up to ``seconds``.

    The reply is read with a timeout of ``seconds`` plus :data:`READ_MARGIN`, not the
    pool's socket timeout, so a server that stops answering (a blackholed link) cannot
    hold a wait past its deadline by more than the margin. The raw reply is returned.

    Raises
    ------
    redis.TimeoutError
        If no reply came in time; the connection is then dropped, not reused.
    """
    if isinstance(client, redis.RedisCluster):
        # Straight to the node that owns the key. A MOVED or ASK (a slot migrating)
        # refreshes the slot map, and the caller's retry goes to the new owner.
        try:
            return blocking_call(node_client(client, key), key, seconds, *args)
        except (redis.exceptions.AskError, redis.ConnectionError):
            client.nodes_manager.initialize()
            raise
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_command(*args)  # type: ignore[no-untyped-call]
        return conn.read_response(timeout=seconds + READ_MARGIN)
    finally:
        pool.release(conn)


class ListBlocker:
    """Issues the blocking list command of the configured read mode.

    The default rotation ``BLMOVE key key RIGHT LEFT`` returns the one element and
    leaves the list and its TTL as they were, so one store wakes every waiter.
    Servers older than 6.2 lack BLMOVE; ``BRPOPLPUSH key key`` does the same there,
    and is used from the first time the server rejects BLMOVE. ``read_once`` uses
    ``BRPOP``, which hands the element to exactly one waiter and removes the key.
    """

    def __init__(self, read_once: bool) -> None:
        self.read_once = read_once
        self._blmove = True

    def pop(self, client: redis.Redis, key: str, seconds: float) -> bytes | None:
        """Block up to ``seconds`` on ``key``; the element, or ``None`` on timeout."""
        if self.read_once:
            reply = blocking_call(client, key, seconds, "BRPOP", key, seconds)
            return None if reply is None else cast(bytes, reply[1])
        if self._blmove:
            try:
                return cast(
                    "bytes | None",
                    blocking_call(
                        client, key, seconds, "BLMOVE", key, key, "RIGHT", "LEFT", seconds
                    ),
                )
            except redis.ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                self._blmove = False
        return cast(
            "bytes | None", blocking_call(client, key, seconds, "BRPOPLPUSH", key, key, seconds)
        )
