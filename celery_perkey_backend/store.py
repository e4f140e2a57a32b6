"""The result store: bytes in, bytes out, one expiring Redis list per task.

It knows nothing of Celery: it takes encoded payloads and state letters, and hands
stored bytes back as :class:`Record` objects for the layer above to decode. It owns the
client, the scripts (loaded and reloaded here only), pipelining, error translation, the
retry policy, and the per-node split on a cluster. Sweep, stats, the CLI and the Celery
backend all work through its public methods.

An optional *fallback* is a read-only string key per task that every read also looks
at, in the same round trip: results that Celery's ``redis://`` backend wrote, read
during a switch (see :mod:`.legacy`). A *group fallback* does the same for saved groups.

Waiters of many tasks share one *inbox* per process: a waiter registers the inbox in
the task's ``watchers`` set and reads the task's state in the same script, and the store
script pushes a small *notification* to every registered inbox as it writes a state
(see ``lua/store.lua`` for its format, :func:`parse_note` to read it).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

import redis
from redis.crc import key_slot

from . import scripts
from .connection import (
    RetryPolicy,
    blocking_call,
    client_for,
    node_client,
    primaries,
    redis_errors,
)
from .errors import BackendUnavailableError, PerkeyError, quote_id
from .keys import KeyLayout
from .scripts import Script
from .settings import Settings
from .urls import mask_url

logger = logging.getLogger("celery_perkey_backend")

__all__ = [
    "INBOX_TTL_MS",
    "INLINE_MAX",
    "ChordStall",
    "ChordTally",
    "KeyInfo",
    "Note",
    "Probe",
    "Record",
    "ResultStore",
    "parse_note",
]

#: The largest stored element a notification carries along; a larger one is read.
INLINE_MAX = 4096

#: How long an inbox lives after its last notification: a process that died leaves
#: its unread notifications behind for no longer.
INBOX_TTL_MS = 60_000

Kind = Literal["ready", "progress", "fallback"]


@dataclass(frozen=True)
class Record:
    """One stored state of a task, as bytes.

    ``kind`` says where it came from: ``"ready"`` (the result list: the element with
    its header), ``"progress"`` (an intermediate state) or ``"fallback"`` (the fallback
    key, e.g. Celery's ``redis://`` result, whose readiness only its decoder knows).
    """

    task_id: str
    key: str
    payload: bytes
    kind: Kind


class Note(NamedTuple):
    """A notification read from an inbox: the task, and what was stored, when the
    notification carries it (``None``: read it)."""

    task_id: str
    ready: bool
    element: bytes | None


def parse_note(raw: bytes) -> Note:
    """Read a notification (``lua/store.lua`` writes them), strictly.

    A notification is a kind letter (``R``/``P`` carrying the stored element, ``r``/``p``
    without it), the task id's length in bytes (decimal digits, at least 1), ``:``, the
    task id (valid UTF-8), then the element (not empty) or nothing.

    Raises
    ------
    ValueError
        If ``raw`` is not one (``UnicodeDecodeError``, a ``ValueError``, for an id that
        is not valid UTF-8).
    """
    kind, size, colon, rest = raw[:1], *raw[1:].partition(b":")
    if kind not in (b"R", b"P", b"r", b"p") or not colon or not size.isdigit():
        raise ValueError("not a perkey notification")
    length = int(size)
    inline = kind in (b"R", b"P")
    if length == 0 or len(rest) < length + inline or (not inline and len(rest) != length):
        raise ValueError("not a perkey notification")
    task_id = rest[:length].decode("utf-8")
    element = rest[length:] if inline else None
    return Note(task_id, kind in (b"R", b"r"), element)


class Probe(NamedTuple):
    """What one read of a waited-on task found: the ready element, the intermediate
    state, the fallback key's value, and whether the inbox is still registered."""

    ready: Record | None
    state: Record | None
    fallback: Record | None
    registered: bool


class ChordTally(NamedTuple):
    """What recording one chord part found: results so far, the total expected (-1
    while the size is not set, or once the chord is done), whether this call holds the
    claim on the body, ``stale``: the claim value of a claimer that was publishing
    the body and is past its deadline (look for the body before taking it over), and
    ``in_flight``: the header is complete, but parts counted before their store have
    not been reported yet (their tasks may still fail)."""

    parts: int
    total: int
    claimed: bool
    stale: bytes | None = None
    in_flight: bool = False


class ChordStall(NamedTuple):
    """A stalled chord as :meth:`ResultStore.chord_reclaim` found it.

    ``verdict``: ``"C"`` now claimed by the caller (its claimer never sent the body),
    ``"P"`` stalled while publishing (``seen`` is the claim value: look for the body,
    then :meth:`ResultStore.chord_take_over`), ``"-"`` not stalled after all.
    ``total`` is the number of header results.
    """

    verdict: str
    total: int
    seen: bytes | None


@dataclass(frozen=True)
class KeyInfo:
    """A key as an operator sees it: its type, TTL in ms (-1: none) and raw value."""

    key: str
    type: str
    ttl_ms: int
    raw: Any


class ResultStore:
    """Byte-level access to the result keys of one backend configuration.

    Parameters
    ----------
    settings:
        The backend's settings: the server, the key prefix, retries, replicas.
    fallback:
        The name of a task's fallback key, or ``None`` for none.
    group_fallback:
        The name of a saved group's fallback key, or ``None`` for none.
    """

    def __init__(
        self,
        settings: Settings,
        fallback: Callable[[str], str] | None = None,
        group_fallback: Callable[[str], str] | None = None,
    ) -> None:
        self.settings = settings
        self.layout = KeyLayout(
            settings.key_prefix, settings.legacy_prefix, settings.legacy_group_prefix
        )
        self.policy = RetryPolicy(settings.retry)
        self.fallback = fallback
        self.group_fallback = group_fallback
        self._client: redis.Redis | None = None
        self._blmove = True

    @property
    def client(self) -> redis.Redis:
        """The redis-py client (a ``RedisCluster`` on a cluster), shared process-wide."""
        if self._client is None:
            self._client = client_for(self.settings)
        return self._client

    @property
    def is_cluster(self) -> bool:
        return isinstance(self.client, redis.RedisCluster)

    def errors(self, where: str, key: str | None = None) -> Any:
        """A context that turns redis-py errors into this package's, naming ``where``."""
        settings = self.settings
        return redis_errors(
            where, settings.url, key, cluster=settings.is_cluster, also=settings.connection_errors
        )

    # -- running commands -------------------------------------------------------------

    def _eval(self, script: Script, keys: list[Any], args: list[Any], on: Any = None) -> Any:
        """EVALSHA ``script``; a server that lacks it gets every script loaded."""
        target = self.client if on is None else on
        try:
            return target.evalsha(script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self._load_scripts(target)
            return target.evalsha(script.sha, len(keys), *keys, *args)

    def _load_scripts(self, target: Any) -> None:
        for script in scripts.ALL:
            target.script_load(script.source)

    def _pipeline(
        self,
        build: Callable[[Any], None],
        where: str,
        key: str | None = None,
        raise_on_error: bool = True,
        on: Any = None,
    ) -> list[Any]:
        """Run what ``build`` queues as one pipelined round trip, translating errors.

        A server that lacks one of our scripts gets them all loaded, and the pipeline
        runs once more: every command in our pipelines is safe to repeat. On a cluster
        the pipeline is split per node, but it may not hold scripts: those go through
        ``on``, the one node that holds their keys.
        """
        target = self.client if on is None else on
        with self.errors(where, key):
            for attempt in (1, 2):
                with target.pipeline(transaction=False) as pipe:
                    build(pipe)
                    try:
                        replies: list[Any] = pipe.execute(raise_on_error=raise_on_error)
                    except redis.exceptions.NoScriptError:
                        replies = [redis.exceptions.NoScriptError()]
                if attempt == 2 or not any(
                    isinstance(r, redis.exceptions.NoScriptError) for r in replies
                ):
                    break
                self._load_scripts(target)
        return replies

    @staticmethod
    def _queue(pipe: Any, script: Script, keys: list[Any], args: list[Any]) -> None:
        """Queue ``script`` as a bare EVALSHA (redis-py would add a SCRIPT EXISTS)."""
        pipe.evalsha(script.sha, len(keys), *keys, *args)

    # -- writing ----------------------------------------------------------------------

    def write(self, task_id: str, letter: str, payload: bytes, ttl_ms: int) -> bool:
        """Store one state of a task, atomically, in one round trip, and notify its waiters.

        Parameters
        ----------
        letter:
            The ready state's letter (``S``, ``F``, ``R``), or ``""`` for an
            intermediate state, which replaces the task's latest one.
        payload:
            The encoded meta.
        ttl_ms:
            Its TTL; 0 for none.

        Returns
        -------
        bool
            False when a stored SUCCESS was kept (it is final).

        Nothing read back from the task's watchers set can fail a store: a member that
        names no inbox of ours is never written to (and leaves the set), an inbox of
        another type than a list is made a list again; either is logged as one warning
        naming the task and the counts.

        Raises
        ------
        BackendUnavailableError
            Once the retry policy gives up, or when fewer than ``min_replicas``
            replicas acknowledged the write in time.
        ServerFullError
            When the server is out of memory.
        """
        layout = self.layout
        rkey = layout.result(task_id)
        cluster = self.is_cluster
        keys, args = scripts.STORE.bind(
            {"result": rkey, "state": layout.state(task_id), "watchers": layout.watchers(task_id)},
            {
                "letter": letter,
                "payload": payload,
                "ttl_ms": ttl_ms,
                "task_id": task_id,
                # One server: the script pushes the notifications itself, no round trip
                # more. A cluster: the inboxes live in other slots, so they come back.
                "push": "0" if cluster else "1",
                "inline_max": INLINE_MAX,
                "inbox_ttl_ms": INBOX_TTL_MS,
                "inbox_prefix": layout.inbox_prefix,
            },
        )
        where = f"store result of task {quote_id(task_id)}"
        replicas = self.settings.min_replicas

        def once() -> list[Any]:
            if not replicas:
                with self.errors(where, rkey):
                    reply: list[Any] = self._eval(scripts.STORE, keys, args)
                return reply
            # WAIT counts the replicas that have this connection's writes, so the
            # script and WAIT share one connection to the key's primary.
            timeout_ms = self.settings.min_replicas_timeout_ms

            def build(pipe: Any) -> None:
                self._queue(pipe, scripts.STORE, keys, args)
                pipe.execute_command("WAIT", replicas, timeout_ms)

            with self.errors(where, rkey):
                primary = node_client(self.client, rkey)
            reply, acked = self._pipeline(build, where, rkey, on=primary)
            if int(acked) < replicas:
                raise BackendUnavailableError(
                    f"{where}: {acked} of {replicas} replicas acknowledged it "
                    f"within {timeout_ms} ms (perkey_min_replicas)"
                )
            return reply

        reply = self.policy.call(once, f"store of task {quote_id(task_id)}")
        if not reply[0]:
            return False
        skipped, repaired = int(reply[1]), int(reply[2])
        if len(reply) > 3:
            repaired += self._notify(reply[3], [_text(inbox) for inbox in reply[4:]], where)
        if skipped or repaired:
            _report_watchers(where, layout.watchers(task_id), skipped, repaired)
        return True

    def _notify(self, note: bytes, inboxes: list[str], where: str) -> int:
        """Push a notification to inboxes in other slots (a cluster), in one round trip;
        an inbox of another type than a list is made a list again. How many were.

        Best effort: nothing here fails the store, whose result is written. A waiter
        that misses its notification reads the result at its next check.
        """

        def build(pipe: Any) -> None:
            for inbox in inboxes:
                pipe.rpush(inbox, note)
                pipe.pexpire(inbox, INBOX_TTL_MS)

        def rebuild(pipe: Any) -> None:
            for inbox in broken:
                pipe.delete(inbox)
                pipe.rpush(inbox, note)
                pipe.pexpire(inbox, INBOX_TTL_MS)

        broken: list[str] = []
        what = f"{where}: notify its waiters"
        try:
            replies = self._pipeline(build, what, inboxes[0], raise_on_error=False)
            broken = [
                inbox
                for inbox, pushed in zip(inboxes, replies[::2], strict=True)
                if isinstance(pushed, redis.ResponseError)
            ]
            if broken:
                self._pipeline(rebuild, what, broken[0])
        except PerkeyError as exc:
            logger.warning("perkey: %s; its waiters will find it at their next check", exc)
        return len(broken)

    def set(self, key: str, value: bytes | str, ttl_ms: int, what: str = "write") -> None:
        """SET a plain string key (a saved group), with a TTL unless 0; retried."""

        def once() -> None:
            with self.errors(what, key):
                self.client.set(key, value, px=ttl_ms or None)

        self.policy.call(once, f"{what} of {quote_id(key)}")

    def get(self, key: str) -> bytes | None:
        """GET a plain string key."""
        with self.errors("read", key):
            return cast("bytes | None", self.client.get(key))

    def delete(self, key: str) -> None:
        with self.errors("delete", key):
            self.client.delete(key)

    def forget(self, task_id: str) -> None:
        """Remove everything stored for a task, its fallback key included.

        The task's ``watchers`` set stays: it holds the registrations of waits that may
        run on in other processes (a result stored after the forget must still wake
        them), and it expires by itself once no wait renews it.
        """
        layout = self.layout
        doomed = [layout.result(task_id), layout.state(task_id), layout.progress(task_id)]
        if self.fallback is not None:
            doomed.append(self.fallback(task_id))
        self._delete_each(doomed, f"forget task {quote_id(task_id)}")

    def _delete_each(self, doomed: list[str], what: str) -> None:
        """Delete ``doomed`` in one pipeline, key by key: a fallback key lives in
        another slot than ours, so one multi-key DEL would fail on a cluster."""

        def build(pipe: Any) -> None:
            for key in doomed:
                pipe.delete(key)

        self._pipeline(build, what, doomed[0])

    # -- reading ----------------------------------------------------------------------

    def read_state(self, task_id: str) -> Record | None:
        """The latest stored state of one task, in one round trip; ``None`` if none.

        The ready result if there is one, else the latest intermediate state, else the
        fallback key's value.
        """
        layout = self.layout
        rkey, skey = layout.result(task_id), layout.state(task_id)
        fallback = self.fallback(task_id) if self.fallback is not None else None

        def build(pipe: Any) -> None:
            pipe.lindex(rkey, 0)
            pipe.get(skey)
            if fallback is not None:
                pipe.get(fallback)

        replies = self._pipeline(build, f"read result of task {quote_id(task_id)}", rkey)
        if replies[0] is not None:
            return Record(task_id, rkey, replies[0], "ready")
        if replies[1] is not None:
            return Record(task_id, skey, replies[1], "progress")
        if fallback is not None and replies[2] is not None:
            return Record(task_id, fallback, replies[2], "fallback")
        return None

    def read_ready(
        self, task_ids: Sequence[str], consume: bool = False, token: str | None = None
    ) -> dict[str, Record]:
        """The ready results among ``task_ids``, with the fallback keys of the rest.

        One id costs one command, and a second one for the fallback key only when
        there is no result of ours; many ids cost one pipelined round trip (per node).
        ``consume`` takes the results (read-once): of several readers exactly one gets
        each result.

        A take survives a lost reply when its retries pass the same ``token`` (any
        string unique to the take, e.g. a fresh ``uuid4().hex`` per wait): the take
        keeps a copy of what it took (``KeyLayout.taken``) that a retry with the token
        gets back. Once the reply is here the copies are deleted (best effort: they
        expire after :meth:`taken_ttl_ms` anyway). Without a token, a take gets one of
        its own, which no retry can know.
        """
        if consume and token is None:
            token = uuid.uuid4().hex
        if len(task_ids) == 1:
            found = self._read_one(task_ids[0], consume, token)
        elif not (consume and self.is_cluster):
            found = self._read_many(task_ids, consume, self.fallback is not None, token)
        else:
            # A cluster pipeline refuses the take script: one pipeline per primary
            # instead, then the fallback keys (in other slots) for what was not there.
            found = {}
            for node, group in self._by_node(task_ids, "read results"):
                found.update(self._read_many(group, True, False, token, on=node))
            rest = [task_id for task_id in task_ids if task_id not in found]
            if self.fallback is not None and rest:
                found.update(self._read_many(rest, False, True))
        if consume and token is not None:
            self._drop_taken(found, token)
        return found

    def taken_ttl_ms(self) -> int:
        """How long a take's copy lives: a minute, plus twice the time a retry of the
        take may come after its lost reply (the socket timeout, then the retry policy's
        longest pause), so that even a retry whose reply is lost too has one more."""
        retry_s = (self.settings.socket_timeout_s or 0.0) + self.settings.retry.max_pause_s
        return int((60.0 + 2 * retry_s) * 1000)

    def _take_call(self, task_id: str, token: str) -> tuple[list[Any], list[Any]]:
        layout = self.layout
        return scripts.TAKE.bind(
            {
                "result": layout.result(task_id),
                "state": layout.state(task_id),
                "taken": layout.taken(task_id, token),
            },
            {"taken_ttl_ms": self.taken_ttl_ms()},
        )

    def _drop_taken(self, found: dict[str, Record], token: str) -> None:
        """Delete the copies of what a take got, now that its reply has come.

        Best effort: a copy that stays expires (see :meth:`taken_ttl_ms`), and failing
        here would only make the caller retry a take it already has the reply of.
        """
        doomed = [
            self.layout.taken(task_id, token)
            for task_id, record in found.items()
            if record.kind == "ready"
        ]
        if not doomed:
            return

        def build(pipe: Any) -> None:
            for key in doomed:
                pipe.unlink(key)

        try:
            self._pipeline(build, "drop taken copies", doomed[0], raise_on_error=False)
        except PerkeyError as exc:
            logger.debug("perkey: taken copies left to expire (%s)", exc)

    def _read_one(self, task_id: str, consume: bool, token: str | None) -> dict[str, Record]:
        rkey = self.layout.result(task_id)
        with self.errors(f"read result of task {quote_id(task_id)}", rkey):
            if consume and token is not None:
                keys, args = self._take_call(task_id, token)
                element = self._eval(scripts.TAKE, keys, args)
            else:
                element = self.client.lindex(rkey, 0)
        if element is not None:
            return {task_id: Record(task_id, rkey, element, "ready")}
        record = self.read_fallback(task_id)
        return {task_id: record} if record is not None else {}

    def read_fallback(self, task_id: str) -> Record | None:
        """The task's fallback key's value; ``None`` (and no command) without a fallback."""
        if self.fallback is None:
            return None
        key = self.fallback(task_id)
        with self.errors(f"read result of task {quote_id(task_id)}", key):
            value = cast("bytes | None", self.client.get(key))
        return None if value is None else Record(task_id, key, value, "fallback")

    def _read_many(
        self,
        ids: Sequence[str],
        consume: bool,
        fallback: bool,
        token: str | None = None,
        on: Any = None,
    ) -> dict[str, Record]:
        layout = self.layout
        pairs = [(task_id, layout.result(task_id)) for task_id in ids]

        def build(pipe: Any) -> None:
            for task_id, rkey in pairs:
                if consume and token is not None:
                    keys, args = self._take_call(task_id, token)
                    self._queue(pipe, scripts.TAKE, keys, args)
                else:
                    pipe.lindex(rkey, 0)
                if fallback and self.fallback is not None:
                    pipe.get(self.fallback(task_id))

        replies = self._pipeline(build, "read results", None, raise_on_error=False, on=on)
        found: dict[str, Record] = {}
        step = 2 if fallback else 1
        for i, (task_id, rkey) in enumerate(pairs):
            element = replies[i * step]
            if isinstance(element, redis.ResponseError):
                with self.errors(f"read result of task {quote_id(task_id)}", rkey):
                    raise element
            if element is not None:
                found[task_id] = Record(task_id, rkey, element, "ready")
                continue
            old = replies[i * step + 1] if fallback else None
            if old is not None and not isinstance(old, Exception) and self.fallback is not None:
                found[task_id] = Record(task_id, self.fallback(task_id), old, "fallback")
        return found

    # -- blocking ---------------------------------------------------------------------

    def block_ready(self, task_id: str, seconds: float) -> Record | None:
        """Block up to ``seconds`` until the task's result is stored.

        The wait rotates the list's one element (``BLMOVE key key RIGHT LEFT``, or
        ``BRPOPLPUSH`` on servers without BLMOVE), which returns it and leaves the list
        and its TTL as they were, so one store wakes every waiter. When the block ends
        empty, the fallback key is read too.

        Returns
        -------
        Record | None
            The ready result, the fallback key's value, or ``None``.

        Raises
        ------
        BackendUnavailableError
            If the connection broke or the reply did not come in time.
        """
        rkey = self.layout.result(task_id)
        with self.errors(f"wait for task {quote_id(task_id)}", rkey):
            element = self._rotate(rkey, seconds)
        if element is not None:
            return Record(task_id, rkey, element, "ready")
        return self.read_fallback(task_id)

    def _rotate(self, key: str, seconds: float) -> bytes | None:
        client = self.client
        if self._blmove:
            try:
                reply: bytes | None = blocking_call(
                    client, key, seconds, "BLMOVE", key, key, "RIGHT", "LEFT", seconds
                )
                return reply
            except redis.ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                self._blmove = False
        old: bytes | None = blocking_call(client, key, seconds, "BRPOPLPUSH", key, key, seconds)
        return old

    # -- inboxes: many waits on one connection ---------------------------------------

    def register(self, task_ids: Sequence[str], inbox: str, ttl_ms: int) -> dict[str, Probe]:
        """Register ``inbox`` as a waiter of each task, and read each task's state.

        One round trip per node (plus one for the fallback keys on a cluster). A result
        stored before the registration is in the reply; one stored after it is pushed to
        the inbox: nothing falls between.

        Raises
        ------
        ServerFullError
            When the server is out of memory (registering is a write).
        StoreCommandError
            When a task's keys refuse (e.g. one holds another type), naming the first
            such task and its key; the other tasks were registered all the same.
        """
        found: dict[str, Probe] = {}
        layout = self.layout
        for node, ids in self._by_node(task_ids, "register waits"):

            def build(pipe: Any, ids: list[str] = ids) -> None:
                for task_id in ids:
                    keys, args = scripts.REGISTER.bind(
                        {
                            "result": layout.result(task_id),
                            "state": layout.state(task_id),
                            "watchers": layout.watchers(task_id),
                        },
                        {"inbox": inbox, "ttl_ms": ttl_ms},
                    )
                    self._queue(pipe, scripts.REGISTER, keys, args)

            replies = self._pipeline(build, "register waits", inbox, raise_on_error=False, on=node)
            for task_id, reply in zip(ids, replies, strict=True):
                if isinstance(reply, Exception):
                    self._refused(task_id, reply, inbox)
                ready, state = reply
                found[task_id] = self._probe(task_id, ready or None, state or None, True)
        return self._with_fallbacks(found)

    def _refused(self, task_id: str, error: Exception, inbox: str) -> None:
        """Raise the error of one task's registration, naming the task and the key: the
        key is found by reading each of the task's keys on its own."""
        if not isinstance(error, redis.exceptions.OutOfMemoryError):
            self.probe([task_id], inbox)  # raises for the key of the wrong type
        with self.errors(f"register a wait for task {quote_id(task_id)}", inbox):
            raise error

    def probe(self, task_ids: Sequence[str], inbox: str) -> dict[str, Probe]:
        """Read each task's state and whether ``inbox`` is still registered for it.

        Reads only (a server out of memory answers them); one pipelined round trip.

        Raises
        ------
        StoreCommandError
            When a task's key refuses (e.g. it holds another type), naming the first
            such task and the key.
        """
        layout = self.layout

        def build(pipe: Any) -> None:
            for task_id in task_ids:
                pipe.lindex(layout.result(task_id), 0)
                pipe.get(layout.state(task_id))
                pipe.sismember(layout.watchers(task_id), inbox)

        replies = self._pipeline(build, "check waits", inbox, raise_on_error=False)
        found = {}
        for i, task_id in enumerate(task_ids):
            ready, state, registered = replies[3 * i : 3 * i + 3]
            for reply, key in zip(
                (ready, state, registered),
                (layout.result, layout.state, layout.watchers),
                strict=True,
            ):
                if isinstance(reply, Exception):
                    with self.errors(f"check the wait for task {quote_id(task_id)}", key(task_id)):
                        raise reply
            found[task_id] = self._probe(task_id, ready, state, bool(registered))
        return self._with_fallbacks(found)

    def unregister(self, task_ids: Sequence[str], inbox: str) -> None:
        """Take ``inbox`` out of the tasks' watchers (best effort: registrations expire)."""
        layout = self.layout

        def build(pipe: Any) -> None:
            for task_id in task_ids:
                pipe.srem(layout.watchers(task_id), inbox)

        self._pipeline(build, "end waits", inbox)

    def pop_inbox(self, inbox: str, seconds: float) -> bytes | None:
        """Block up to ``seconds`` for the next notification in ``inbox``; ``None`` if
        none came."""
        with self.errors("read notifications", inbox):
            reply = blocking_call(self.client, inbox, seconds, "BLPOP", inbox, seconds)
        return None if reply is None else cast(bytes, reply[1])

    def take_inbox(self, inbox: str, most: int) -> list[bytes]:
        """Take up to ``most`` notifications waiting in ``inbox``, without blocking."""
        with self.errors("read notifications", inbox):
            return cast("list[bytes]", self.client.lpop(inbox, most) or [])

    def close_idle(self) -> None:
        """Close the client's idle connections (those in use stay open); every
        connection reconnects when next used."""
        if self._client is None:
            return
        with self.errors("close connections"):
            for node in primaries(self._client):
                node.connection_pool.disconnect(inuse_connections=False)

    def _by_node(self, task_ids: Sequence[str], where: str) -> list[tuple[Any, list[str]]]:
        """The ids grouped by the node that holds their keys (scripts cannot go through a
        cluster pipeline); one group on a single server."""
        if not self.is_cluster:
            return [(None, list(task_ids))]
        by_node: dict[int, tuple[Any, list[str]]] = {}
        with self.errors(where):
            for task_id in task_ids:
                node = node_client(self.client, self.layout.result(task_id))
                by_node.setdefault(id(node), (node, []))[1].append(task_id)
        return list(by_node.values())

    def _probe(
        self, task_id: str, ready: bytes | None, state: bytes | None, registered: bool
    ) -> Probe:
        layout = self.layout
        return Probe(
            None if ready is None else Record(task_id, layout.result(task_id), ready, "ready"),
            None if state is None else Record(task_id, layout.state(task_id), state, "progress"),
            None,
            registered,
        )

    def _with_fallbacks(self, found: dict[str, Probe]) -> dict[str, Probe]:
        """Add the fallback keys' values of the tasks without a result, in one round trip."""
        fallback = self.fallback
        missing = [task_id for task_id, probe in found.items() if probe.ready is None]
        if fallback is None or not missing:
            return found

        def build(pipe: Any) -> None:
            for task_id in missing:
                pipe.get(fallback(task_id))

        values = self._pipeline(build, "read results", None)
        for task_id, value in zip(missing, values, strict=True):
            if value is not None:
                record = Record(task_id, fallback(task_id), value, "fallback")
                found[task_id] = found[task_id]._replace(fallback=record)
        return found

    # -- chords -----------------------------------------------------------------------

    def chord_size(self, group_id: str, count: int, ttl_ms: int) -> None:
        """Set a chord's size for a new run (retried)."""
        chord = self.layout.chord_keys(group_id)
        keys, args = scripts.CHORD_SIZE.bind(
            {"size": chord.size, "claim": chord.claim}, {"count": count, "ttl_ms": ttl_ms}
        )

        def once() -> None:
            with self.errors(f"set size of chord {quote_id(group_id)}", chord.size):
                self._eval(scripts.CHORD_SIZE, keys, args)

        self.policy.call(once, f"chord size of {quote_id(group_id)}")

    def chord_add(self, group_id: str) -> None:
        """Count one more member of a running chord (``add_to_chord``)."""
        added = self.layout.chord_keys(group_id).added
        with self.errors(f"add to chord {quote_id(group_id)}", added):
            self.client.incr(added)

    def chord_part(
        self,
        group_id: str,
        task_id: str,
        value: bytes,
        index: str | int,
        ttl_ms: int,
        group_ttl_ms: int,
        claim_ttl_ms: int,
        token: str,
        take: bool = True,
        final: bool = False,
    ) -> ChordTally:
        """Record one header result, once per task and index, and maybe claim the body.

        With ``take`` false the result is about to be stored: it counts at once, in
        flight (and a complete chord is marked as waiting for a claimer, with a deadline
        of ``claim_ttl_ms``). With ``take`` the task reports it: a part in flight is
        settled, with ``value`` if ``final`` (the part's final result: a failure, or
        what its task stored), else with the value it was counted with; the body is
        claimed once no part is in flight (``in_flight`` says when some are). A retry
        with the same ``token`` is safe: the part counts once and finds its own claim.
        """
        chord = self.layout.chord_keys(group_id)
        keys, args = scripts.CHORD_PART.bind(
            {
                "results": chord.results,
                "size": chord.size,
                "counted": chord.counted,
                "claim": chord.claim,
                "added": chord.added,
                "group": self.layout.group(group_id),
                "flight": chord.flight,
            },
            {
                "task_id": task_id,
                "value": value,
                "ordered": "1" if self.settings.chord_ordered else "0",
                "index": index,
                "ttl_ms": ttl_ms,
                "group_ttl_ms": group_ttl_ms,
                "claim_ttl_ms": claim_ttl_ms,
                "take": "1" if take else "0",
                "token": token,
                "final": "1" if final else "0",
            },
        )

        def once() -> ChordTally:
            with self.errors(f"chord part of {quote_id(group_id)}", chord.results):
                count, total, status, seen = self._eval(scripts.CHORD_PART, keys, args)
            status = int(status)
            stale = seen if status == 2 else None
            return ChordTally(int(count), int(total), status == 1, stale, status == 3)

        return self.policy.call(once, f"chord part of {quote_id(group_id)}")

    def chord_in_flight(self, group_id: str) -> dict[tuple[str, str], bytes]:
        """The parts of a chord counted before their store and not reported since: the
        value each was counted with, by task id and header index (``"+inf"`` for none)."""
        flight = self.layout.chord_keys(group_id).flight
        with self.errors(f"read chord {quote_id(group_id)}", flight):
            fields = cast("dict[bytes, bytes]", self.client.hgetall(flight))
        parts: dict[tuple[str, str], bytes] = {}
        for field, value in fields.items():
            task_id, sep, index = field.decode("utf-8").rpartition(":")
            if sep and value:
                parts[(task_id, index)] = value
        return parts

    def chord_values(self, group_id: str, total: int) -> list[bytes]:
        """The header results of a chord, in header order (or arrival order)."""
        results = self.layout.chord_keys(group_id).results
        with self.errors(f"read chord {quote_id(group_id)}", results):
            if self.settings.chord_ordered:
                values = self.client.zrange(results, 0, -1)
            else:
                values = self.client.lrange(results, 0, total - 1)
        return cast("list[bytes]", values)

    def chord_done(self, group_id: str, token: str, marker_ttl_ms: int) -> bool:
        """Mark a chord's body published and drop its data, if ``token`` holds the claim."""
        chord = self.layout.chord_keys(group_id)
        keys, args = scripts.CHORD_DONE.bind(
            chord.named(), {"token": token, "marker_ttl_ms": marker_ttl_ms}
        )

        def once() -> bool:
            with self.errors(f"finish chord {quote_id(group_id)}", chord.claim):
                return bool(self._eval(scripts.CHORD_DONE, keys, args))

        return self.policy.call(once, f"finish chord {quote_id(group_id)}")

    # -- for operators: walking and weighing the keyspace ------------------------------

    def primaries(self) -> list[redis.Redis]:
        """A client per primary: the server, or each primary of a cluster."""
        with self.errors("list primaries"):
            return primaries(self.client)

    def dbsize(self) -> int:
        """Keys in the database, on every primary together."""
        with self.errors("count keys"):
            return sum(int(node.dbsize()) for node in primaries(self.client))

    def used_memory(self) -> int:
        """The servers' ``used_memory``, on every primary together."""
        with self.errors("read memory figures"):
            return sum(int(node.info("memory")["used_memory"]) for node in primaries(self.client))

    def server_time_ms(self) -> int:
        """The server's clock, in ms."""
        with self.errors("read the server time"):
            seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def scan(self, pattern: str, count: int) -> Iterator[tuple[redis.Redis, list[str]]]:
        """Pages of keys matching ``pattern``, with the primary that holds them.

        SCAN may repeat a key. Each page comes from one server, so the scripts that look
        at it can be pipelined to that server (a cluster pipeline refuses scripts).
        """
        for node in self.primaries():
            cursor = 0
            while True:
                with self.errors("scan"):
                    cursor, page = node.scan(cursor, match=pattern, count=count)
                if page:
                    yield node, [_text(k) for k in page]
                if cursor == 0:
                    break

    def slot_groups(self, names: Sequence[str]) -> list[list[int]]:
        """Indexes of ``names`` grouped so that each group's keys can share one script.

        A single server takes them all at once; a cluster needs one group per slot.
        """
        if not self.is_cluster:
            return [list(range(len(names)))]
        groups: dict[int, list[int]] = {}
        for index, name in enumerate(names):
            groups.setdefault(key_slot(name.encode("utf-8", "surrogateescape")), []).append(index)
        return list(groups.values())

    def run_scripts(
        self,
        node: redis.Redis,
        script: Script,
        calls: Iterable[tuple[list[Any], list[Any]]],
        where: str,
        weigh: Sequence[str] = (),
    ) -> tuple[list[Any], list[int]]:
        """Run ``script`` once per ``(keys, args)`` on ``node``, in one round trip.

        ``weigh`` adds MEMORY USAGE of those keys to the same round trip.

        Returns
        -------
        tuple
            The script's replies, in order, and the sizes weighed (keys gone skipped).
        """
        calls = list(calls)

        def build(pipe: Any) -> None:
            for keys, args in calls:
                self._queue(pipe, script, keys, args)
            for key in weigh:
                pipe.memory_usage(key)

        replies = self._pipeline(build, where, on=node)
        sizes = [int(size) for size in replies[len(calls) :] if size]
        return replies[: len(calls)], sizes

    def take_lock(self, key: str, token: str, ttl_ms: int) -> bool:
        """SET NX PX: True if ``token`` now holds the lock."""
        with self.errors("take lock", key):
            return bool(self.client.set(key, token, nx=True, px=ttl_ms))

    def renew_lock(self, key: str, token: str, ttl_ms: int) -> bool:
        """Renew the lock if ``token`` still holds it."""
        keys, args = scripts.LOCK_RENEW.bind({"lock": key}, {"token": token, "ttl_ms": ttl_ms})
        with self.errors("renew lock", key):
            return bool(self._eval(scripts.LOCK_RENEW, keys, args))

    def release_lock(self, key: str, token: str) -> None:
        """Release the lock if ``token`` holds it."""
        keys, args = scripts.LOCK_RELEASE.bind({"lock": key}, {"token": token})
        with self.errors("release lock", key):
            self._eval(scripts.LOCK_RELEASE, keys, args)

    def inspect(self, names: Sequence[str], where: str) -> list[KeyInfo]:
        """Type, TTL and raw value of each existing key among ``names``."""
        found = []
        with self.errors(where, names[0] if names else None):
            for key in names:
                kind = cast(bytes, self.client.type(key)).decode()
                if kind == "none":
                    continue
                found.append(KeyInfo(key, kind, int(self.client.pttl(key)), self._raw(key, kind)))
        return found

    def _raw(self, key: str, kind: str) -> Any:
        if kind == "list":
            return self.client.lindex(key, 0)
        if kind == "string":
            return self.client.get(key)
        if kind == "stream":
            return self.client.xrevrange(key, count=1)
        if kind == "set":
            return sorted(self.client.smembers(key))
        return f"<{kind}>"

    # -- chord recovery: publishing, takeovers, stalled chords ------------------------

    def chord_publishing(self, group_id: str, token: str, claim_ttl_ms: int) -> bool:
        """Record that ``token``'s holder is about to publish the body (retried).

        False when it lost the claim meanwhile: it must not publish.
        """
        claim = self.layout.chord_keys(group_id).claim
        keys, args = scripts.CHORD_PUBLISHING.bind(
            {"claim": claim}, {"token": token, "claim_ttl_ms": claim_ttl_ms}
        )

        def once() -> bool:
            with self.errors(f"publish chord {quote_id(group_id)}", claim):
                return bool(self._eval(scripts.CHORD_PUBLISHING, keys, args))

        return self.policy.call(once, f"publish chord {quote_id(group_id)}")

    def chord_take_over(self, group_id: str, seen: bytes, token: str, claim_ttl_ms: int) -> bool:
        """Claim the body for ``token`` if the claim is still ``seen`` (retried)."""
        claim = self.layout.chord_keys(group_id).claim
        keys, args = scripts.CHORD_TAKE_OVER.bind(
            {"claim": claim}, {"seen": seen, "token": token, "claim_ttl_ms": claim_ttl_ms}
        )

        def once() -> bool:
            with self.errors(f"take over chord {quote_id(group_id)}", claim):
                return bool(self._eval(scripts.CHORD_TAKE_OVER, keys, args))

        return self.policy.call(once, f"take over chord {quote_id(group_id)}")

    def _stall_call(
        self, group_id: str, take: bool, token: str = "", claim_ttl_ms: int = 0
    ) -> tuple[list[Any], list[Any]]:
        chord = self.layout.chord_keys(group_id)
        return scripts.CHORD_STALLED.bind(
            {
                "results": chord.results,
                "size": chord.size,
                "claim": chord.claim,
                "added": chord.added,
                "flight": chord.flight,
            },
            {
                "ordered": "1" if self.settings.chord_ordered else "0",
                "take": "1" if take else "0",
                "token": token,
                "claim_ttl_ms": claim_ttl_ms,
            },
        )

    def chord_reclaim(self, group_id: str, token: str, claim_ttl_ms: int) -> ChordStall:
        """Claim a stalled chord for ``token``: complete, not published, its claim late."""
        keys, args = self._stall_call(group_id, True, token, claim_ttl_ms)
        claim = self.layout.chord_keys(group_id).claim
        with self.errors(f"reclaim chord {quote_id(group_id)}", claim):
            verdict, total, seen = self._eval(scripts.CHORD_STALLED, keys, args)
        verdict = _text(verdict)
        return ChordStall(verdict, int(total), seen if verdict == "P" else None)

    def stalled_chords(self, node: redis.Redis, group_ids: Sequence[str]) -> list[str]:
        """Those of ``group_ids`` (chords whose keys ``node`` holds) that have stalled.

        Stalled: the header is complete, the body not marked published, and the claim
        past its deadline. One pipelined round trip; nothing is changed.
        """
        if not group_ids:
            return []
        calls = [self._stall_call(group_id, False) for group_id in group_ids]
        replies, _ = self.run_scripts(node, scripts.CHORD_STALLED, calls, "find stalled chords")
        return [
            group_id
            for group_id, (verdict, _, _) in zip(group_ids, replies, strict=True)
            if _text(verdict) == "S"
        ]

    def chord_save_body(self, group_id: str, payload: bytes, ttl_ms: int) -> None:
        """Keep a chord's encoded body (its task id and signature) for a repair."""
        self.set(self.layout.chord_keys(group_id).body, payload, ttl_ms, "save chord body")

    def chord_body(self, group_id: str) -> bytes | None:
        """A chord's encoded body, as :meth:`chord_save_body` kept it."""
        return self.get(self.layout.chord_keys(group_id).body)

    # -- for operators: the server's own state (doctor) ---------------------------------
    # Read-only, one server at a time, never retried: a check should report what it
    # finds now. Errors are translated like everywhere else, so a caller can tell a
    # refused command (StoreCommandError, e.g. NOPERM) from a server it cannot reach
    # (BackendUnavailableError).

    def node_name(self, node: redis.Redis) -> str:
        """``host:port`` (or the socket path) of one server, for reports."""
        kwargs = node.connection_pool.connection_kwargs
        if kwargs.get("path"):
            return str(kwargs["path"])
        if kwargs.get("host"):
            return f"{kwargs['host']}:{kwargs.get('port', 6379)}"
        return mask_url(self.settings.url)

    def server_info(self, node: redis.Redis, section: str) -> dict[str, Any]:
        """``INFO section`` of one server (see :meth:`primaries`), parsed."""
        with self.errors(f"read INFO {section} of {self.node_name(node)}"):
            return node.info(section)

    def server_config(self, node: redis.Redis, name: str) -> str | None:
        """``CONFIG GET name`` of one server; ``None`` if it has no such parameter.

        Raises
        ------
        StoreCommandError
            If the server refuses (an ACL user without ``config|get``, a managed
            service that renames CONFIG).
        """
        with self.errors(f"read config {name!r} of {self.node_name(node)}"):
            reply = cast("dict[Any, Any]", node.config_get(name))
        for key, value in reply.items():
            if _text(key) == name:
                return _text(value)
        return None

    def cluster_info(self, node: redis.Redis) -> dict[str, str]:
        """``CLUSTER INFO`` as one node of a cluster sees it."""
        with self.errors(f"read CLUSTER INFO of {self.node_name(node)}"):
            reply = node.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
        if isinstance(reply, dict):  # redis-py parses it under some protocols
            return {_text(k): _text(v) for k, v in reply.items()}
        lines = _text(reply).splitlines()
        pairs = (line.split(":", 1) for line in lines if ":" in line)
        return {key.strip(): value.strip() for key, value in pairs}

    # -- for the sweep: one batch's scripts and the next page, in one round trip ---------

    def scan_page(
        self, node: redis.Redis, cursor: int, pattern: str, count: int
    ) -> tuple[int, list[str]]:
        """One SCAN page of ``node``: the next cursor (0 once done) and the keys."""
        with self.errors("scan"):
            cursor, page = node.scan(cursor, match=pattern, count=count)
        return int(cursor), [_text(k) for k in page]

    def run_scripts_and_scan(
        self,
        node: redis.Redis,
        script: Script,
        calls: Iterable[tuple[list[Any], list[Any]]],
        where: str,
        scan: tuple[int, str, int] | None = None,
    ) -> tuple[list[Any], tuple[int, list[str]] | None]:
        """:meth:`run_scripts`, with the SCAN page ``(cursor, pattern, count)`` fetched
        in the same round trip, after the scripts.

        Returns
        -------
        tuple
            The scripts' replies, and the page as :meth:`scan_page` gives it (``None``
            without ``scan``).
        """
        calls = list(calls)

        def build(pipe: Any) -> None:
            for keys, args in calls:
                self._queue(pipe, script, keys, args)
            if scan is not None:
                pipe.scan(scan[0], match=scan[1], count=scan[2])

        replies = self._pipeline(build, where, on=node)
        page = None
        if scan is not None:
            cursor, keys = replies[len(calls)]
            page = int(cursor), [_text(k) for k in keys]
        return replies[: len(calls)], page

    # -- the switch from redis:// (saved groups, legacy keys; see legacy.py) ---------

    def read_group(self, group_id: str) -> bytes | None:
        """A saved group's value: ours, else the group fallback key's; one round trip."""
        ours = self.layout.group(group_id)
        other = self.group_fallback(group_id) if self.group_fallback is not None else None

        def build(pipe: Any) -> None:
            pipe.get(ours)
            if other is not None:
                pipe.get(other)

        replies = self._pipeline(build, f"restore group {quote_id(group_id)}", ours)
        value = replies[0] if replies[0] is not None else (replies[1] if other else None)
        return cast("bytes | None", value)

    def forget_group(self, group_id: str) -> None:
        """Delete a saved group, its group fallback key included."""
        doomed = [self.layout.group(group_id)]
        if self.group_fallback is not None:
            doomed.append(self.group_fallback(group_id))
        self._delete_each(doomed, f"delete group {quote_id(group_id)}")

    def peek(
        self, node: redis.Redis, names: Sequence[str], values: bool = False
    ) -> list[tuple[int, bytes | None]]:
        """Each key's remaining TTL in ms (-1: none, -2: gone) and, with ``values``, its
        string value, from ``node`` in one round trip."""

        def build(pipe: Any) -> None:
            for key in names:
                pipe.pttl(key)
                if values:
                    pipe.get(key)

        replies = self._pipeline(build, "read keys", None, raise_on_error=False, on=node)
        step = 2 if values else 1
        found = []
        for i in range(len(names)):
            value = replies[i * step + 1] if values else None
            found.append((int(replies[i * step]), value if isinstance(value, bytes) else None))
        return found

    def give_ttl(self, node: redis.Redis, names: Sequence[str], ttl_ms: int) -> int:
        """Give each of ``names`` that has no TTL this one, atomically per key, on ``node``
        in one round trip. How many got one."""
        calls = [scripts.EXPIRE_PERSISTENT.bind({"key": key}, {"ttl_ms": ttl_ms}) for key in names]
        replies, _ = self.run_scripts(node, scripts.EXPIRE_PERSISTENT, calls, "give keys a TTL")
        return sum(int(reply) for reply in replies)

    # -- metrics kept in Redis, for Prometheus (see prometheus.py) -------------------

    def record_metrics(
        self, changes: Sequence[tuple[str, str, int | str]], stats: bytes = b"", stats_ms: int = 0
    ) -> list[str]:
        """Apply ``changes`` to the metrics hash in one atomic step: ``("+", field, n)``
        adds to a counter, ``("=", field, value)`` sets a field. ``stats`` (measured at
        server time ``stats_ms``) replaces the stored key metrics unless those are newer.

        Returns the fields that held no number where one was needed: each was set anew
        (see ``lua/metrics_record.lua``).
        """
        flat: list[Any] = [part for change in changes for part in change]
        keys, args = scripts.METRICS_RECORD.bind(
            {"metrics": self.layout.metrics},
            {"stats_ms": stats_ms, "stats": stats, "changes": flat},
        )
        with self.errors("record metrics", self.layout.metrics):
            repaired = self._eval(scripts.METRICS_RECORD, keys, args)
        return [_text(name) for name in repaired]

    def read_metrics(self) -> dict[str, bytes]:
        """Every field of the metrics hash."""
        with self.errors("read metrics", self.layout.metrics):
            fields = self.client.hgetall(self.layout.metrics)
        return {_text(name): value for name, value in cast("dict[bytes, bytes]", fields).items()}

    def server_clients(self) -> list[tuple[str, dict[str, int]]]:
        """Each primary's address and client counts (``INFO clients``), read now."""
        found = []
        with self.errors("read client counts"):
            for node in primaries(self.client):
                # A Sentinel's master moves: it is named by its name.
                name = getattr(node.connection_pool, "service_name", None) or self.node_name(node)
                info = node.info("clients")
                found.append((str(name), {k: int(v) for k, v in info.items() if _whole(v)}))
        return found


def _report_watchers(where: str, watchers: str, skipped: int, repaired: int) -> None:
    """Say what a store found wrong among its task's watchers (see ``lua/store.lua``)."""
    found = []
    if skipped:
        found.append(f"skipped {skipped} member(s) of {watchers!r} that name no inbox of ours")
    if repaired:
        found.append(f"replaced {repaired} inbox(es) of another type than a list")
    logger.warning("perkey: %s: %s; the result is stored", where, " and ".join(found))


def _text(key: bytes | str) -> str:
    return key if isinstance(key, str) else key.decode("utf-8", "surrogateescape")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
