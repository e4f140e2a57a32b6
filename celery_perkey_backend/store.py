"""The result store: bytes in, bytes out, one expiring Redis list per task.

It knows nothing of Celery: it takes encoded payloads and state letters, and hands
stored bytes back as :class:`Record` objects for the layer above to decode. It owns the
client, the scripts (loaded and reloaded here only), pipelining, error translation, the
retry policy, and the per-node split on a cluster. Sweep, stats, the CLI and the Celery
backend all work through its public methods.

An optional *fallback* is a read-only string key per task that every read also looks
at, in the same round trip: results that Celery's ``redis://`` backend wrote, read
during a switch (see :mod:`.legacy`). A *group fallback* does the same for saved groups.
"""

from __future__ import annotations

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
from .errors import BackendUnavailableError, quote_id
from .keys import KeyLayout
from .scripts import Script
from .settings import Settings
from .urls import mask_url

__all__ = [
    "PROGRESS_GRACE_MS",
    "PROGRESS_HISTORY",
    "ChordTally",
    "KeyInfo",
    "Record",
    "ResultStore",
]

#: How many intermediate states a task's progress stream keeps.
PROGRESS_HISTORY = 16

#: How long a task's progress stream outlives its becoming ready (ms): long enough for
#: every on_message waiter to see the marker, far shorter than the result's TTL.
PROGRESS_GRACE_MS = 10_000

#: The field of a progress stream entry that holds an intermediate state.
FIELD_META = b"m"

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


class ChordTally(NamedTuple):
    """What recording one chord part found: results so far, the total expected (-1
    while the size is not set, or once the chord is done), and whether this call
    claimed the body."""

    parts: int
    total: int
    claimed: bool


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
        return redis_errors(where, self.settings.url, key)

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
        """Store one state of a task, atomically, in one round trip.

        Parameters
        ----------
        letter:
            The ready state's letter (``S``, ``F``, ``R``), or ``""`` for an
            intermediate state, which goes to the progress stream.
        payload:
            The encoded meta.
        ttl_ms:
            Its TTL; 0 for none.

        Returns
        -------
        bool
            False when a stored SUCCESS was kept (it is final).

        Raises
        ------
        BackendUnavailableError
            Once the retry policy gives up, or when fewer than ``min_replicas``
            replicas acknowledged the write in time.
        """
        layout = self.layout
        rkey = layout.result(task_id)
        grace = min(ttl_ms, PROGRESS_GRACE_MS) if ttl_ms else PROGRESS_GRACE_MS
        keys, args = scripts.STORE.bind(
            {"result": rkey, "progress": layout.progress(task_id)},
            {
                "letter": letter,
                "payload": payload,
                "ttl_ms": ttl_ms,
                "history": PROGRESS_HISTORY,
                "grace_ms": grace,
            },
        )
        where = f"store result of task {quote_id(task_id)}"
        replicas = self.settings.min_replicas

        def once() -> bool:
            if not replicas:
                with self.errors(where, rkey):
                    return bool(self._eval(scripts.STORE, keys, args))
            # WAIT counts the replicas that have this connection's writes, so the
            # script and WAIT share one connection to the key's primary.
            timeout_ms = self.settings.min_replicas_timeout_ms

            def build(pipe: Any) -> None:
                self._queue(pipe, scripts.STORE, keys, args)
                pipe.execute_command("WAIT", replicas, timeout_ms)

            with self.errors(where, rkey):
                primary = node_client(self.client, rkey)
            stored, acked = self._pipeline(build, where, rkey, on=primary)
            if int(acked) < replicas:
                raise BackendUnavailableError(
                    f"{where}: {acked} of {replicas} replicas acknowledged it "
                    f"within {timeout_ms} ms (perkey_min_replicas)"
                )
            return bool(stored)

        return self.policy.call(once, f"store of task {quote_id(task_id)}")

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
        """Remove everything stored for a task, its fallback key included."""
        doomed = [self.layout.result(task_id), self.layout.progress(task_id)]
        if self.fallback is not None:
            doomed.append(self.fallback(task_id))

        def build(pipe: Any) -> None:
            for key in doomed:  # one by one: the fallback key lives in another slot
                pipe.delete(key)

        self._pipeline(build, f"forget task {quote_id(task_id)}", doomed[0])

    # -- reading ----------------------------------------------------------------------

    def read_state(self, task_id: str) -> Record | None:
        """The latest stored state of one task, in one round trip; ``None`` if none.

        The ready result if there is one, else the newest intermediate state, else the
        fallback key's value.
        """
        layout = self.layout
        rkey, pkey = layout.result(task_id), layout.progress(task_id)
        fallback = self.fallback(task_id) if self.fallback is not None else None

        def build(pipe: Any) -> None:
            pipe.lindex(rkey, 0)
            pipe.xrevrange(pkey, count=1)
            if fallback is not None:
                pipe.get(fallback)

        replies = self._pipeline(build, f"read result of task {quote_id(task_id)}", rkey)
        ready, latest = replies[0], replies[1]
        if ready is not None:
            return Record(task_id, rkey, ready, "ready")
        if latest and FIELD_META in latest[0][1]:
            return Record(task_id, pkey, latest[0][1][FIELD_META], "progress")
        if fallback is not None and replies[2] is not None:
            return Record(task_id, fallback, replies[2], "fallback")
        return None

    def read_ready(self, task_ids: Sequence[str], consume: bool = False) -> dict[str, Record]:
        """The ready results among ``task_ids``, with the fallback keys of the rest.

        One id costs one command, and a second one for the fallback key only when
        there is no result of ours; many ids cost one pipelined round trip (per node).
        ``consume`` takes the results (read-once): of several readers exactly one gets
        each result.
        """
        if len(task_ids) == 1:
            return self._read_one(task_ids[0], consume)
        if not (consume and self.is_cluster):
            return self._read_many(task_ids, consume, self.fallback is not None)
        # A cluster pipeline refuses the take script: one pipeline per primary instead,
        # then the fallback keys (in other slots) for what was not there.
        by_node: dict[int, tuple[redis.Redis, list[str]]] = {}
        with self.errors("read results"):
            for task_id in task_ids:
                node = node_client(self.client, self.layout.result(task_id))
                by_node.setdefault(id(node), (node, []))[1].append(task_id)
        found: dict[str, Record] = {}
        for node, group in by_node.values():
            found.update(self._read_many(group, True, False, on=node))
        rest = [task_id for task_id in task_ids if task_id not in found]
        if self.fallback is not None and rest:
            found.update(self._read_many(rest, False, True))
        return found

    def _read_one(self, task_id: str, consume: bool) -> dict[str, Record]:
        rkey = self.layout.result(task_id)
        with self.errors(f"read result of task {quote_id(task_id)}", rkey):
            if consume:
                keys, _ = scripts.TAKE.bind(
                    {"result": rkey, "progress": self.layout.progress(task_id)}
                )
                element = self._eval(scripts.TAKE, keys, [])
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
        self, ids: Sequence[str], consume: bool, fallback: bool, on: Any = None
    ) -> dict[str, Record]:
        layout = self.layout
        pairs = [(task_id, layout.result(task_id)) for task_id in ids]

        def build(pipe: Any) -> None:
            for task_id, rkey in pairs:
                if consume:
                    keys, _ = scripts.TAKE.bind(
                        {"result": rkey, "progress": layout.progress(task_id)}
                    )
                    self._queue(pipe, scripts.TAKE, keys, [])
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

    def watch(
        self, task_id: str, last_id: bytes, ttl_ms: int
    ) -> tuple[Record | None, list[tuple[bytes, bytes]]]:
        """One step of a wait that follows intermediate states.

        Returns
        -------
        tuple
            The ready result if stored, and otherwise the intermediate states stored
            after ``last_id``, as ``(entry id, payload)`` pairs; the last id seen is
            the next ``last_id``. Markers come as an empty payload.
        """
        rkey, pkey = self.layout.result(task_id), self.layout.progress(task_id)
        keys, args = scripts.WATCH.bind(
            {"result": rkey, "progress": pkey}, {"last_id": last_id, "ttl_ms": ttl_ms}
        )
        with self.errors(f"wait for task {quote_id(task_id)}", rkey):
            ready, entries = self._eval(scripts.WATCH, keys, args)
        if ready:
            return Record(task_id, rkey, ready, "ready"), []
        states = []
        for entry_id, flat in entries or ():
            fields = dict(zip(flat[::2], flat[1::2], strict=False))
            states.append((entry_id, fields.get(FIELD_META, b"")))
        return None, states

    def block_progress(self, task_id: str, last_id: bytes, seconds: float) -> bool:
        """Block up to ``seconds`` for a progress entry after ``last_id``; True if one came."""
        pkey = self.layout.progress(task_id)
        with self.errors(f"wait for task {quote_id(task_id)}", pkey):
            news = blocking_call(
                self.client, pkey, seconds, "XREAD", "BLOCK", max(1, int(seconds * 1000)),
                "STREAMS", pkey, last_id,
            )  # fmt: skip
        return bool(news)

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
    ) -> ChordTally:
        """Record one header result, once per task and index, and maybe claim the body.

        A retry with the same ``token`` is safe: the part counts once.
        """
        chord = self.layout.chord_keys(group_id)
        keys, args = scripts.CHORD_PART.bind(
            {**chord.named(), "group": self.layout.group(group_id)},
            {
                "task_id": task_id,
                "value": value,
                "ordered": "1" if self.settings.chord_ordered else "0",
                "index": index,
                "ttl_ms": ttl_ms,
                "group_ttl_ms": group_ttl_ms,
                "claim_ttl_ms": claim_ttl_ms,
                "token": token,
            },
        )

        def once() -> ChordTally:
            with self.errors(f"chord part of {quote_id(group_id)}", chord.results):
                count, total, claimed = self._eval(scripts.CHORD_PART, keys, args)
            return ChordTally(int(count), int(total), bool(claimed))

        return self.policy.call(once, f"chord part of {quote_id(group_id)}")

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
        """Drop a finished chord's data if ``token`` still holds the claim."""
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
        return f"<{kind}>"

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

    # -- the switch from redis:// (saved groups, legacy keys; see legacy.py) ---------

    def read_group(self, group_id: str) -> bytes | None:
        """A saved group's value: ours, else the group fallback key's; one round trip."""
        ours = self.layout.group(group_id)
        other = self.group_fallback(group_id) if self.group_fallback is not None else None

        def build(pipe: Any) -> None:
            pipe.get(ours)
            if other is not None:
                pipe.get(other)

        replies = self._pipeline(build, f"restore group {group_id!r}", ours)
        value = replies[0] if replies[0] is not None else (replies[1] if other else None)
        return cast("bytes | None", value)

    def forget_group(self, group_id: str) -> None:
        """Delete a saved group, its group fallback key included."""
        doomed = [self.layout.group(group_id)]
        if self.group_fallback is not None:
            doomed.append(self.group_fallback(group_id))

        def build(pipe: Any) -> None:
            for key in doomed:  # one by one: the fallback key lives in another slot
                pipe.delete(key)

        self._pipeline(build, f"delete group {group_id!r}", doomed[0])

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
    ) -> None:
        """Apply ``changes`` to the metrics hash in one atomic step: ``("+", field, n)``
        adds to a counter, ``("=", field, value)`` sets a field. ``stats`` (measured at
        server time ``stats_ms``) replaces the stored key metrics unless those are newer.
        """
        flat: list[Any] = [part for change in changes for part in change]
        keys, args = scripts.METRICS_RECORD.bind(
            {"metrics": self.layout.metrics},
            {"stats_ms": stats_ms, "stats": stats, "changes": flat},
        )
        with self.errors("record metrics", self.layout.metrics):
            self._eval(scripts.METRICS_RECORD, keys, args)

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


def _text(key: bytes | str) -> str:
    return key if isinstance(key, str) else key.decode("utf-8", "surrogateescape")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
