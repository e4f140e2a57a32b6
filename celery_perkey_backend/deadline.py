"""Deadlines, kept on the client's monotonic clock.

A wait has one deadline that every command it issues shares. Server-side timeouts are
rounded to the server's clock tick, so the client keeps its own clock as well.
"""

from __future__ import annotations

import time

__all__ = ["MIN_BLOCK", "Deadline"]

#: The shortest blocking command: a blocking timeout of 0 means "forever" to the server.
MIN_BLOCK = 0.01


class Deadline:
    """An overall deadline shared by every command of one wait.

    Parameters
    ----------
    timeout:
        Seconds from now, or ``None`` to wait forever.
    """

    __slots__ = ("_end",)

    def __init__(self, timeout: float | None) -> None:
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
