"""Switching from Celery's ``redis://`` backend: everything the switch needs, in one place.

While ``perkey_legacy_fallback`` is on, the store reads the keys that ``redis://``
wrote beside ours, in the same round trip: a task's ``celery-task-meta-<id>`` string
and a saved group's ``celery-taskset-meta-<id>`` string (below the same
``global_keyprefix`` that ``redis://`` used). :func:`fallbacks` names them for the store.

The rest is for operators, to know when the switch is done:

- :func:`count_legacy` counts the legacy keys on a page of keys, by kind and TTL
  (``stats()`` uses it);
- :func:`survey` walks every legacy key and says which are still *in flight*: any
  legacy result or saved group, ready or not, with or without a TTL. The backend cannot
  tell a result someone already collected from one still to be read, so only their
  absence makes turning the fallback off safe (``celery perkey migrate --check``);
- :func:`expire_legacy` gives legacy keys without a TTL one, so that they end.

Legacy chord keys (``celery-taskset-meta-<id>.j`` and the like) are counted but never
in flight: this backend never reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from celery import states

from .keys import LEGACY_KINDS, glob_escape
from .settings import Settings
from .store import Record, ResultStore

__all__ = [
    "LegacyCounts",
    "LegacySurvey",
    "count_legacy",
    "expire_legacy",
    "fallbacks",
    "survey",
]

KeyName = Callable[[str], str]


def fallbacks(store_settings: Settings) -> tuple[KeyName | None, KeyName | None]:
    """The store's task and group fallback key names, or ``(None, None)`` when
    ``perkey_legacy_fallback`` is off."""
    if not store_settings.legacy_fallback:
        return None, None
    task_prefix, group_prefix = store_settings.legacy_prefix, store_settings.legacy_group_prefix
    return (lambda task_id: task_prefix + task_id), (lambda group_id: group_prefix + group_id)


@dataclass
class LegacyCounts:
    """Legacy keys by kind (``task``, ``group``, ``chord``), and those without a TTL."""

    keys: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LEGACY_KINDS, 0))
    without_ttl: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LEGACY_KINDS, 0))

    def scaled(self, scale: float) -> LegacyCounts:
        """The counts multiplied by ``scale`` (estimates from a sample)."""
        return LegacyCounts(
            {kind: round(n * scale) for kind, n in self.keys.items()},
            {kind: round(n * scale) for kind, n in self.without_ttl.items()},
        )


def count_legacy(
    store: ResultStore, node: redis.Redis, names: list[str], counts: LegacyCounts
) -> None:
    """Add the legacy keys among ``names`` (one page from ``node``) to ``counts``."""
    layout = store.layout
    found = [(name, kind) for name in names if (kind := layout.legacy_kind_of(name))]
    if not found:
        return
    for (_, kind), (ttl_ms, _) in zip(found, store.peek(node, [n for n, _ in found]), strict=True):
        if ttl_ms == -2:
            continue  # gone since the scan
        counts.keys[kind] += 1
        if ttl_ms == -1:
            counts.without_ttl[kind] += 1


@dataclass
class LegacySurvey:
    """Every legacy key, and whether the switch from ``redis://`` is done.

    ``in_flight`` counts what still needs ``perkey_legacy_fallback``: every legacy
    result and saved group. ``last_expiry_s`` is when the last of those that have a TTL
    expires, from now; those without one never do (:func:`expire_legacy`).
    """

    results: int = 0
    results_not_ready: int = 0
    results_unreadable: int = 0
    results_without_ttl: int = 0
    groups: int = 0
    groups_without_ttl: int = 0
    chord_keys: int = 0
    last_expiry_s: float | None = None
    fallback: bool = True

    @property
    def in_flight(self) -> int:
        return self.results + self.groups

    @property
    def without_ttl(self) -> int:
        return self.results_without_ttl + self.groups_without_ttl

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "in_flight": self.in_flight}


def survey(
    store: ResultStore,
    decode: Callable[[Record], dict[str, Any]] | None = None,
    count: int = 1000,
) -> LegacySurvey:
    """Walk every legacy key (SCAN with an escaped MATCH on each legacy prefix).

    Parameters
    ----------
    decode:
        Turns a legacy result into its meta (the backend's decoder), to tell results
        still being worked on (STARTED, RETRY, PROGRESS…) from ready ones; without it
        none is counted as not ready.
    count:
        SCAN's COUNT hint.

    Raises
    ------
    BackendUnavailableError
        If the server cannot be reached.
    """
    layout = store.layout
    report = LegacySurvey(fallback=store.settings.legacy_fallback)
    latest_ms = -1
    for prefix in (layout.legacy_prefix, layout.legacy_group_prefix):
        for node, page in store.scan(glob_escape(prefix) + "*", count):
            kinds = [layout.legacy_kind_of(name) for name in page]
            wanted = decode is not None and prefix == layout.legacy_prefix
            for name, kind, (ttl_ms, value) in zip(
                page, kinds, store.peek(node, page, values=wanted), strict=True
            ):
                if ttl_ms == -2 or kind is None:
                    continue
                if kind == "chord":
                    report.chord_keys += 1
                    continue
                latest_ms = max(latest_ms, ttl_ms)
                if kind == "group":
                    report.groups += 1
                    report.groups_without_ttl += ttl_ms == -1
                    continue
                report.results += 1
                report.results_without_ttl += ttl_ms == -1
                if decode is not None and value is not None:
                    task_id = name[len(layout.legacy_prefix) :]
                    try:
                        status = decode(Record(task_id, name, value, "fallback"))["status"]
                    except Exception:
                        report.results_unreadable += 1
                        continue
                    report.results_not_ready += status not in states.READY_STATES
    report.last_expiry_s = latest_ms / 1000 if latest_ms >= 0 else None
    return report


def expire_legacy(store: ResultStore, ttl_s: float, count: int = 1000) -> int:
    """Give every legacy key that has no TTL (results, groups, chord keys) ``ttl_s``.

    Keys that have a TTL keep it. Returns how many keys got one.
    """
    layout = store.layout
    ttl_ms = max(1, int(ttl_s * 1000))
    given = 0
    for prefix in (layout.legacy_prefix, layout.legacy_group_prefix):
        for node, page in store.scan(glob_escape(prefix) + "*", count):
            given += store.give_ttl(node, page, ttl_ms)
    return given
