"""Deadlines, kept on the client's monotonic clock.

A wait has one deadline that every command it issues shares. Server-side timeouts are
rounded to the server's clock tick, so the client keeps its own clock as well.
"""

from __future__ import annotations

import math
import numbers
import time

__all__ = ["MIN_BLOCK", "Deadline"]

#: The shortest blocking command: a blocking timeout of 0 means "forever" to the server.
MIN_BLOCK = 0.01


class Deadline:
    """An overall deadline shared by every command of one wait.

    Every timeout a user gives (``get``, ``join``, ``wait_for``, ``aio.wait``,
    ``aio.as_completed``, ``aio.watch``) becomes one of these, so they all read a
    timeout the same way:

    - ``None`` or infinity: no deadline, the wait lasts as long as it takes;
    - a negative number is taken as zero, as Celery's own backends do: what is already
      stored is still returned, and nothing is waited for;
    - NaN, which compares false with everything and so would never expire, is refused,
      and so is anything that is not a real number.

    Parameters
    ----------
    timeout:
        Seconds from now, or ``None`` to wait forever.

    Raises
    ------
    ValueError
        For a NaN timeout.
    TypeError
        For a timeout that is not a real number (a ``bool`` included).
    """

    __slots__ = ("_end",)

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else _end_of(timeout)

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

    def sooner(self, other: Deadline | None) -> Deadline:
        """This deadline or ``other``, whichever ends first (``None``: this one)."""
        if other is None or other._end is None:
            return self
        if self._end is None or other._end < self._end:
            return other
        return self


def _end_of(timeout: object) -> float | None:
    """The monotonic time ``timeout`` seconds from now (``None``: never)."""
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(
            f"timeout must be a number of seconds or None. Got {timeout!r} "
            f"({type(timeout).__name__}) instead."
        )
    seconds = float(timeout)
    if math.isnan(seconds):
        raise ValueError(
            f"timeout must be a number of seconds or None. Got {timeout!r} instead: "
            "a NaN timeout would never expire."
        )
    if math.isinf(seconds) and seconds > 0:
        return None
    return time.monotonic() + max(seconds, 0.0)
