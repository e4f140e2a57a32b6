"""The Redis key layout: every key name the backend writes, defined once.

Layout, below ``prefix`` (``global_keyprefix`` + ``perkey_key_prefix``):

================  ===========  ==========================================================
key               type         holds
================  ===========  ==========================================================
``r:{<id>}``      list         one element: the ready meta (SUCCESS, FAILURE, REVOKED),
                               behind a short header (state letter and write time)
``s:{<id>}``      string       the latest intermediate state (STARTED, RETRY, PROGRESS,
                               ...) behind the same header; gone once the task is ready
``w:{<id>}``      set          the inboxes of the processes waiting on the task
``i:{<name>}``    list         one process's inbox: notifications of stored states
``k:{<id>}:<t>``  string       a read-once take's copy of what it took, for a retry of that
                               take (token ``<t>``) whose reply was lost; short-lived
``p:{<id>}``      stream       intermediate states as versions before 0.2 kept them;
                               read by nothing, left to expire
``g:{<gid>}``     string       a saved ``GroupResult``
``c:{<gid>}:j``   zset / list  a chord's header results, by header index or arrival order
``c:{<gid>}:s``   string       a chord's size
``c:{<gid>}:t``   string       members added to a running chord (``add_to_chord``)
``c:{<gid>}:d``   set          header results already counted (duplicate deliveries)
``c:{<gid>}:f``   hash         header results counted before they were stored, until their
                               tasks report them (``on_chord_part_return``)
``c:{<gid>}:c``   string       who publishes the body, and by when (see :mod:`.chords`), then
                               "done"
``c:{<gid>}:b``   string       the body's task id and signature, for a repair
``lock:sweep``    string       the sweep lock
``metrics``       hash         sweep counts and the last key metrics, for Prometheus
================  ===========  ==========================================================

Everything one script or transaction touches shares a hash tag: a task's two keys
share ``{<id>}``, a group's and its chord's keys share ``{<gid>}``. Ids that contain a
brace would break the tag, so they are tagged by a digest instead and kept in full after
it. That keeps every multi-key operation within one Redis Cluster slot.

The sweep and ``stats()`` read the grammar back through :meth:`KeyLayout.kind_of`; the
server-side scripts never parse key names themselves.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

from .errors import InvalidIdError, quote_id

__all__ = [
    "KIND_NAMES",
    "LEGACY_GROUP_PREFIX",
    "LEGACY_KINDS",
    "LEGACY_TASK_PREFIX",
    "READY_LETTERS",
    "ChordKeys",
    "KeyLayout",
    "ReadyRecord",
    "acl_rules",
    "glob_escape",
    "parse_ready",
]

#: The one-letter code of each ready state, written in front of the stored meta.
#: The store script only needs to recognise ``S``: a stored SUCCESS is final.
READY_LETTERS = {"SUCCESS": "S", "FAILURE": "F", "REVOKED": "R"}

#: The legacy key that Celery's built-in Redis backend writes.
LEGACY_TASK_PREFIX = "celery-task-meta-"

#: Where Celery's built-in Redis backend saves a ``GroupResult``; its chord keys are
#: this name with ``.j``, ``.s``, ``.t``, ``.d`` or ``.c`` after it.
LEGACY_GROUP_PREFIX = "celery-taskset-meta-"

#: The kinds of legacy key, as :meth:`KeyLayout.legacy_kind_of` names them.
LEGACY_KINDS = ("task", "group", "chord")

_LEGACY_CHORD_SUFFIXES = (".j", ".s", ".t", ".d", ".c")

#: The kind of each key of ours, by the code :meth:`KeyLayout.kind_of` gives it.
KIND_NAMES = {
    "r": "result",
    "s": "progress",
    "p": "progress",
    "w": "watchers",
    "i": "inbox",
    "k": "taken",
    "g": "group",
    "j": "chord",
    "n": "chord",
    "d": "chord",
    "c": "chord",
    "t": "chord",
    "b": "chord",
    "f": "chord",
    "x": "unknown",
}

#: The kind code of each chord key, by the letter its name ends in.
_CHORD_CODES = {"j": "j", "s": "n", "d": "d", "c": "c", "t": "t", "b": "b", "f": "f"}

#: The chord parts whose data is gone once the chord's size key is: "leftovers".
CHORD_DATA_PARTS = frozenset("jdtbf")

_SWEEP_LOCK = "lock:sweep"
_METRICS = "metrics"


def _tagged(ident: str, what: str) -> str:
    """The id inside its hash tag, checked: no key can be made of an empty id, or of
    one that is not valid text (a lone surrogate cannot be encoded)."""
    if not ident:
        raise InvalidIdError(f"{what} must not be empty, got {ident!r}")
    try:
        encoded = ident.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidIdError(f"{what} {quote_id(ident)} is not valid text: {exc.reason}") from None
    if "{" in ident or "}" in ident:
        return "{" + hashlib.sha1(encoded).hexdigest() + "}" + ident
    return "{" + ident + "}"


class ChordKeys(NamedTuple):
    """The keys of one chord, by name (see the module's table)."""

    results: str
    size: str
    counted: str
    claim: str
    added: str
    body: str
    flight: str

    def named(self) -> dict[str, str]:
        """The keys by name, as the chord scripts take them."""
        return dict(self._asdict())


@dataclass(frozen=True)
class KeyLayout:
    """Builds every key name the backend uses, and reads them back.

    Parameters
    ----------
    prefix:
        Prepended to every key of ours, e.g. ``"celery-perkey:"``.
    legacy_prefix:
        The prefix under which Celery's built-in backend wrote results, including any
        ``global_keyprefix``; read only, to serve results in flight during a switch.
    legacy_group_prefix:
        The same for its saved groups (and, with a suffix, its chord keys).
    """

    prefix: str
    legacy_prefix: str = LEGACY_TASK_PREFIX
    legacy_group_prefix: str = LEGACY_GROUP_PREFIX

    def result(self, task_id: str) -> str:
        return f"{self.prefix}r:{_tagged(task_id, 'task id')}"

    def state(self, task_id: str) -> str:
        return f"{self.prefix}s:{_tagged(task_id, 'task id')}"

    def watchers(self, task_id: str) -> str:
        return f"{self.prefix}w:{_tagged(task_id, 'task id')}"

    def progress(self, task_id: str) -> str:
        """A task's progress stream, as versions before 0.2 wrote it."""
        return f"{self.prefix}p:{_tagged(task_id, 'task id')}"

    def inbox(self, name: str) -> str:
        return f"{self.prefix}i:{_tagged(name, 'inbox name')}"

    @property
    def inbox_prefix(self) -> str:
        """What every inbox name starts with: an inbox is this, a name without braces
        (:meth:`inbox` is only ever given such names), then ``}``."""
        return f"{self.prefix}i:{{"

    def taken(self, task_id: str, token: str) -> str:
        """What a read-once take with ``token`` took of the task, kept for a retry of
        that take (see ``lua/take.lua``); in the task's hash slot."""
        return f"{self.prefix}k:{_tagged(task_id, 'task id')}:{token}"

    def legacy(self, task_id: str) -> str:
        return f"{self.legacy_prefix}{task_id}"

    def legacy_group(self, group_id: str) -> str:
        return f"{self.legacy_group_prefix}{group_id}"

    def legacy_kind_of(self, name: str) -> str | None:
        """``"task"``, ``"group"`` or ``"chord"`` for a key Celery's ``redis://`` backend
        writes (below the same ``global_keyprefix``), ``None`` for any other key."""
        if name.startswith(self.legacy_prefix):
            return "task"
        if name.startswith(self.legacy_group_prefix):
            return "chord" if name.endswith(_LEGACY_CHORD_SUFFIXES) else "group"
        return None

    def group(self, group_id: str) -> str:
        return f"{self.prefix}g:{_tagged(group_id, 'group id')}"

    def chord(self, group_id: str, part: str) -> str:
        return f"{self.prefix}c:{_tagged(group_id, 'group id')}:{part}"

    def chord_keys(self, group_id: str) -> ChordKeys:
        chord = self.chord
        return ChordKeys(
            results=chord(group_id, "j"),
            size=chord(group_id, "s"),
            counted=chord(group_id, "d"),
            claim=chord(group_id, "c"),
            added=chord(group_id, "t"),
            body=chord(group_id, "b"),
            flight=chord(group_id, "f"),
        )

    @property
    def sweep_lock(self) -> str:
        return self.prefix + _SWEEP_LOCK

    @property
    def metrics(self) -> str:
        """The hash that holds the sweep counts and key metrics Prometheus is shown."""
        return self.prefix + _METRICS

    @property
    def match_all(self) -> str:
        """A SCAN MATCH pattern for every key of ours and nothing else."""
        return glob_escape(self.prefix) + "*"

    def kind_of(self, name: str) -> str | None:
        """The kind code of a key under our prefix (see :data:`KIND_NAMES`).

        ``None`` for the sweep lock and the metrics hash, which no sweep or count looks
        at, and ``"x"`` for anything under the prefix that we never write.
        """
        rest = name[len(self.prefix) :]
        if rest in (_SWEEP_LOCK, _METRICS):
            return None
        code = rest[:1]
        if rest[1:3] != ":{":
            return "x"
        if code in "rswpigk":
            return code
        if code == "c" and len(rest) > 5 and rest[-2] == ":" and rest[-1] in _CHORD_CODES:
            return _CHORD_CODES[rest[-1]]
        return "x"

    def chord_group(self, name: str) -> str | None:
        """The group id of a chord key of ours; ``None`` for any other key."""
        if self.kind_of(name) not in {"j", "n", "d", "c", "t", "b", "f"}:
            return None
        # "{<id>}", or "{<sha1>}<id>" for an id that holds a brace (see _tagged).
        tagged = name[len(self.prefix) + 2 : -2]
        close = tagged.find("}")
        if close < 1:
            return None
        return tagged[close + 1 :] or tagged[1:close] or None

    @property
    def match_chord_claims(self) -> str:
        """A SCAN MATCH pattern for the claim key of every chord of ours."""
        return glob_escape(self.prefix) + "c:{*:c"

    def chord_size_key(self, name: str, kind: str | None = None) -> str | None:
        """For a chord data key (results, counted, added, body, in flight), its chord's
        size key.

        ``kind``: the key's :meth:`kind_of`, when the caller has it already.
        """
        if (kind or self.kind_of(name)) in CHORD_DATA_PARTS:
            return name[:-1] + "s"
        return None


@dataclass(frozen=True)
class ReadyRecord:
    """A ready result as it is stored: the state letter, the write time, the meta."""

    letter: str
    written_ms: int
    payload: bytes


def parse_ready(element: bytes) -> ReadyRecord:
    """Split a stored element (a ready result, or an intermediate state: letter ``P``)
    into its header and the encoded meta.

    Raises
    ------
    ValueError
        If the element does not carry the header the store script writes.
    """
    head, sep, payload = element.partition(b"|")
    if not sep or len(head) < 2 or not head[1:].isdigit():
        raise ValueError("the stored element lacks the perkey header")
    return ReadyRecord(head[:1].decode("ascii"), int(head[1:]), payload)


def glob_escape(text: str) -> str:
    """Escape glob metacharacters so that SCAN MATCH takes ``text`` literally."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


# -- least privilege ------------------------------------------------------------------

#: Every command the backend, its scripts, the sweep, ``stats()`` and redis-py's
#: connection handshake run (but those of :data:`ACL_SUBCOMMANDS_SINCE`).
#: An ACL user limited to these and to our keys runs it all.
ACL_COMMANDS = (
    # connection
    "hello", "auth", "client|setname", "ping", "select",
    # results and waits
    "evalsha", "eval", "script|load", "script|exists", "lindex", "rpush", "rpop", "lrange", "llen",
    "blmove", "brpoplpush", "blpop", "lpop", "get", "set", "del", "unlink", "exists",
    "pexpire", "expire", "time", "incr", "sadd", "srem", "sismember", "smembers", "zadd",
    "zcard", "zrange", "type", "pttl", "xrevrange", "xinfo|stream",
    # sweep and stats, and the metrics hash
    "scan", "dbsize", "info", "memory|usage", "hget", "hset", "hincrby", "hgetall",
)  # fmt: skip


#: Subcommands that redis-py's connection handshake tries, by the ``redis_version``
#: (``INFO server``) that brought them, ``None`` for none of the servers we support
#: (Valkey reports ``redis_version`` 7.2.4). redis-py ignores their failure, so a user
#: without these rules still connects: a rule only spares the server a refused command
#: (and an ``ACL LOG`` entry) per connection.
ACL_SUBCOMMANDS_SINCE: dict[str, tuple[int, int] | None] = {
    "client|setinfo": (7, 2),
    "client|maint_notifications": None,  # redis-py 8 under RESP3
}

#: From this version on, a server refuses a rule that names a subcommand it does not
#: know (Redis 7.0 refuses ``+client|setinfo``); before it, any subcommand is taken.
_CHECKS_SUBCOMMANDS = (7, 0)


def acl_rules(layout: KeyLayout, server_version: str | None = None) -> str:
    """The ``ACL SETUSER`` rules for a least-privilege backend user.

    It may touch only our keys, plus the legacy ``celery-task-meta-*`` and
    ``celery-taskset-meta-*`` keys that reads fall back to during a switch from
    ``redis://`` (drop those patterns when ``perkey_legacy_fallback`` is off).

    Parameters
    ----------
    server_version:
        The server's ``redis_version`` (``INFO server``). Without it, the rules are
        those every supported server accepts (Redis 6.2 and later, Valkey); with it,
        they also allow the handshake's subcommands that this server takes a rule for
        (:data:`ACL_SUBCOMMANDS_SINCE`).
    """
    patterns = " ".join(
        f"~{glob_escape(prefix)}*"
        for prefix in (layout.prefix, layout.legacy_prefix, layout.legacy_group_prefix)
    )
    commands = list(ACL_COMMANDS)
    if server_version is not None:
        known = _version(server_version)
        commands += [
            name
            for name, since in ACL_SUBCOMMANDS_SINCE.items()
            if known < _CHECKS_SUBCOMMANDS or (since is not None and known >= since)
        ]
    return f"resetkeys {patterns} resetchannels -@all " + " ".join(
        f"+{command}" for command in commands
    )


def _version(text: str) -> tuple[int, ...]:
    """``"7.0.15"`` as ``(7, 0, 15)``; a part that is not a number ends it."""
    parts: list[int] = []
    for part in text.strip().split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)
