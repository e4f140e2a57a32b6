"""The server-side Lua scripts, loaded from ``lua/*.lua`` and called with named keys.

Each file opens with a header that names its keys and arguments in order::

    -- KEYS: result, progress
    -- ARGV: letter, payload, ttl_ms, history, grace_ms

and callers pass them by those names (:meth:`Script.bind`), so a key can never go to
the wrong position. A name ending in ``...`` takes the rest of the list. A ``USES:``
line prepends a shared Lua library from the same folder.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = [
    "ALL",
    "CHORD_DONE",
    "CHORD_PART",
    "CHORD_PUBLISHING",
    "CHORD_SIZE",
    "CHORD_STALLED",
    "CHORD_TAKE_OVER",
    "EXPIRE_PERSISTENT",
    "LOCK_RELEASE",
    "LOCK_RENEW",
    "METRICS_RECORD",
    "REGISTER",
    "STATS_BATCH",
    "STORE",
    "SWEEP_BATCH",
    "TAKE",
    "Script",
]

_HEADER = re.compile(r"^-- (KEYS|ARGV|USES): (.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Script:
    """One Lua script: its source, digest and the names of its KEYS and ARGV."""

    name: str
    source: str
    sha: str
    keys: tuple[str, ...]
    args: tuple[str, ...]

    @classmethod
    def load(cls, name: str) -> Script:
        """Read ``lua/<name>.lua`` and its header."""
        text = _read(name)
        header: dict[str, tuple[str, ...]] = {}
        for field, names in _HEADER.findall(text):
            header[field] = tuple(part.strip() for part in names.split(","))
        source = "".join(_read(lib) + "\n" for lib in header.get("USES", ())) + text
        return cls(
            name=name,
            source=source,
            sha=hashlib.sha1(source.encode()).hexdigest(),
            keys=header.get("KEYS", ()),
            args=header.get("ARGV", ()),
        )

    def bind(
        self, keys: Mapping[str, Any], args: Mapping[str, Any] | None = None
    ) -> tuple[list[Any], list[Any]]:
        """KEYS and ARGV in the script's order, from values given by name.

        Raises
        ------
        KeyError
            If a name is missing or unknown: a programming error, never the user's.
        """
        return _ordered(self.name, self.keys, keys), _ordered(self.name, self.args, args or {})


def _ordered(script: str, names: tuple[str, ...], values: Mapping[str, Any]) -> list[Any]:
    if set(values) != {name.removesuffix("...") for name in names}:
        raise KeyError(f"{script}.lua takes {names}, got {sorted(values)}")
    ordered: list[Any] = []
    for name in names:
        if name.endswith("..."):
            rest: Sequence[Any] = values[name[:-3]]
            ordered.extend(rest)
        else:
            ordered.append(values[name])
    return ordered


def _read(name: str) -> str:
    return resources.files(__package__).joinpath(f"lua/{name}.lua").read_text("utf-8")


STORE = Script.load("store")
REGISTER = Script.load("register")
TAKE = Script.load("take")
CHORD_PART = Script.load("chord_part")
CHORD_SIZE = Script.load("chord_size")
CHORD_DONE = Script.load("chord_done")
CHORD_PUBLISHING = Script.load("chord_publishing")
CHORD_TAKE_OVER = Script.load("chord_take_over")
CHORD_STALLED = Script.load("chord_stalled")
SWEEP_BATCH = Script.load("sweep_batch")
STATS_BATCH = Script.load("stats_batch")
LOCK_RELEASE = Script.load("lock_release")
LOCK_RENEW = Script.load("lock_renew")
EXPIRE_PERSISTENT = Script.load("expire_persistent")
METRICS_RECORD = Script.load("metrics_record")

#: Every script, so that a server missing one (a promoted replica, a flushed script
#: cache) gets them all loaded at once.
ALL = tuple(value for value in list(globals().values()) if isinstance(value, Script))
