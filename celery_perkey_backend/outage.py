"""How a multiplexer's background threads live through an outage.

Its two threads meet the same outage: one warning tells of it (when there are waits
to tell about, and the process is not exiting), each failure pauses a little longer,
and only once the failures outnumber the retry policy's retries and outlast its pauses
does every wait fail. Anything but a lost connection (refused access) fails every wait
at once: what one task's keys cause is dealt with before it gets here.
"""

from __future__ import annotations

import logging
import threading
import time

from .connection import RetryPolicy
from .errors import BackendUnavailableError, PerkeyError

__all__ = ["Outage"]

logger = logging.getLogger("celery_perkey_backend")


class Outage:
    """The failures of one multiplexer since the server last answered.

    Parameters
    ----------
    policy:
        The one retry policy: how many failures, over how long, before waits fail.
    quiet:
        After the server answers again, how long a failure is taken for the other
        thread's call meeting the outage that just ended, and not warned about.
    """

    def __init__(self, policy: RetryPolicy, quiet: float) -> None:
        self.policy = policy
        self.quiet = quiet
        self._lock = threading.Lock()
        #: Failures since the server last answered.
        self.failures = 0
        self._since: float | None = None
        self._warned = False
        self._quiet_until = 0.0

    def failed(self, exc: PerkeyError, waits: bool) -> tuple[bool, float]:
        """Note a failure: whether every wait fails with it now, and how long to pause
        before trying again. ``waits``: whether there are waits to warn about."""
        now = time.monotonic()
        with self._lock:
            self.failures += 1
            failures = self.failures
            if self._since is None:
                self._since = now
            down_for = now - self._since
            warn = not self._warned and waits and now >= self._quiet_until
            self._warned = True
        if warn and threading.main_thread().is_alive():
            if isinstance(exc, BackendUnavailableError):
                logger.warning("perkey: waits lost their connection (%s); retrying", exc)
            else:
                logger.warning("perkey: every wait of the process failed: %s", exc)
        limit = self.policy.max_retries
        budget = self.policy.budget_s() or 0.0
        give_up = not isinstance(exc, BackendUnavailableError) or (
            limit is not None and failures > limit and down_for >= budget
        )
        if give_up:
            self.ok()
        return give_up, min(1.0, 0.05 * (1 << min(failures, 5)))

    def ok(self) -> None:
        """The server answers (again): the next outage is a new one."""
        with self._lock:
            if self.failures:
                self._quiet_until = time.monotonic() + self.quiet
            self.failures = 0
            self._since = None
            self._warned = False
