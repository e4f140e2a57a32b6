"""The Celery result backend: one expiring Redis list per task, waited on with a
blocking list command instead of pub/sub or polling.

Adopted by configuration alone::

    result_backend = "perkey://:password@host:6379/0"
"""

from __future__ import annotations

import logging
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import redis
from celery import states
from celery.backends.base import KeyValueStoreBackend
from celery.canvas import maybe_signature
from celery.exceptions import BackendStoreError, ChordError, TimeoutError
from celery.result import GroupResult, allow_join_result
from celery.utils.functional import _regen
from kombu.utils.objects import cached_property
from redis.commands.core import Script

from . import keys
from .connection import (
    client_for,
    connection_kwargs,
    mask_url,
    node_client,
    redis_errors,
    to_redis_url,
)
from .errors import BackendUnavailableError, ConfigurationError, CorruptResultError
from .sweep import SweepOptions, SweepSummary, parse_duration, sweep
from .tasks import register_sweep_task
from .waiting import Deadline, ListBlocker, block_cap, blocking_call

if TYPE_CHECKING:
    from .metrics import KeyStats

__all__ = ["PerkeyBackend"]

logger = logging.getLogger(__name__)

Meta = dict[str, Any]

#: Redis refuses strings longer than this; a larger result could never be stored.
REDIS_MAX_BULK = 512 * 1024 * 1024

#: How many intermediate states a task's progress stream keeps.
PROGRESS_HISTORY = 16

#: How long a task's progress stream outlives its becoming ready (ms): long enough for
#: every on_message waiter to see the marker, far shorter than the result's TTL.
PROGRESS_GRACE_MS = 10_000

#: The most pending results one prefetch asks for in its pipeline.
PREFETCH_LIMIT = 5000

#: The defaults of the ``perkey_*`` settings (documented in the README).
DEFAULTS: Mapping[str, Any] = {
    "perkey_key_prefix": "celery-perkey:",
    "perkey_read_once": False,
    "perkey_legacy_fallback": True,
    "perkey_max_result_bytes": REDIS_MAX_BULK,
    "perkey_min_replicas": 0,
    "perkey_min_replicas_timeout": 1.0,
    "perkey_sweep_max_age": 86400.0,
    "perkey_sweep_delete": False,
    "perkey_sweep_ttl": None,
    "perkey_sweep_scan_count": 1000,
    "perkey_sweep_batch_size": 200,
    "perkey_sweep_pause": 0.0,
    "perkey_sweep_lock_ttl": 60.0,
    "perkey_sweep_memory_samples": 100,
    "perkey_prometheus_port": None,
    "perkey_prometheus_textfile": None,
}


class PerkeyBackend(KeyValueStoreBackend):  # type: ignore[misc]
    """Celery result backend keeping each task's result in its own Redis list.

    Parameters
    ----------
    app:
        The Celery app; every setting is read from ``app.conf``.
    url:
        The backend URL after Celery removed ``perkey+`` (``perkey://`` arrives whole).
    """

    supports_native_join = True
    # False makes celery beat schedule Celery's own celery.backend_cleanup (daily),
    # which calls cleanup(): the sweep.
    supports_autoexpire = False
    supports_result_compression = True
    supports_failure_expires = True

    def __init__(self, app: Any, url: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("expires_type", float)
        super().__init__(app=app, url=url, **kwargs)
        conf = self.app.conf
        self.url = url
        self._redis_url = to_redis_url(url)
        failure_expires = conf.get("result_failure_expires")
        self.failure_expires = (
            self.expires
            if failure_expires is None
            else self.prepare_expires(failure_expires, type=float)
        )
        transport = conf.get("result_backend_transport_options") or {}
        self._transport_options: Mapping[str, Any] = transport
        global_prefix = transport.get("global_keyprefix") or ""
        if global_prefix and global_prefix[-1] not in ":_-.":
            global_prefix += "_"
        self.layout = keys.KeyLayout(
            prefix=global_prefix + self._setting("perkey_key_prefix"),
            legacy_prefix=global_prefix + keys.LEGACY_TASK_PREFIX,
        )
        if self._redis_url.startswith("cluster://") and {"{", "}"} & set(self.layout.prefix):
            raise ConfigurationError(
                f"key prefix {self.layout.prefix!r} holds a brace: on a cluster it would "
                "replace each key's hash tag; remove it from global_keyprefix/perkey_key_prefix"
            )
        self.read_once: bool = bool(self._setting("perkey_read_once"))
        self.legacy_fallback: bool = bool(self._setting("perkey_legacy_fallback"))
        self.max_result_bytes: int = int(self._setting("perkey_max_result_bytes"))
        self.min_replicas: int = int(self._setting("perkey_min_replicas"))
        self.min_replicas_timeout: int = int(
            parse_duration(self._setting("perkey_min_replicas_timeout"), "timeout") * 1000
        )
        self.retry_policy = {
            **KeyValueStoreBackend.retry_policy,
            **(transport.get("retry_policy") or {}),
        }
        self.chord_ordered = bool(
            transport.get("result_chord_ordered", conf.get("result_chord_ordered", True))
        )
        self._connection_kwargs = connection_kwargs(conf)
        self._block_cap = block_cap(self._connection_kwargs.get("socket_timeout"))
        self._blocker = ListBlocker(self.read_once)
        # Results this thread's callers hold but have not collected yet (a GroupResult
        # registers its members), so one pipelined read can serve a whole join().
        self._pending: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self._prefetched: dict[str, Meta] = {}
        self._scripts: dict[str, Script] = {}

        register_sweep_task(self.app)

    def _setting(self, name: str) -> Any:
        value = self.app.conf.get(name)
        return DEFAULTS[name] if value is None else value

    # -- the sweep and the figures ----------------------------------------------------

    def sweep_options(self, **overrides: Any) -> SweepOptions:
        """The sweep's options: the ``perkey_sweep_*`` settings, then ``overrides``.

        Raises
        ------
        ConfigurationError
            If an option is unknown or a duration cannot be read.
        """
        fallback_ttl = self.expires if self.expires else 86400.0
        values: dict[str, Any] = {
            "max_age": self._setting("perkey_sweep_max_age"),
            "delete": self._setting("perkey_sweep_delete"),
            "ttl": self._setting("perkey_sweep_ttl") or fallback_ttl,
            "scan_count": self._setting("perkey_sweep_scan_count"),
            "batch_size": self._setting("perkey_sweep_batch_size"),
            "pause": self._setting("perkey_sweep_pause"),
            "lock_ttl": self._setting("perkey_sweep_lock_ttl"),
            "memory_samples": self._setting("perkey_sweep_memory_samples"),
        }
        unknown = set(overrides) - {*values, "dry_run"}
        if unknown:
            raise ConfigurationError(f"unknown sweep option(s): {', '.join(sorted(unknown))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        for name in ("max_age", "ttl", "pause", "lock_ttl"):
            values[name] = parse_duration(values[name], name)
        return SweepOptions(**values)

    def run_sweep(
        self, progress: Callable[[int, int], None] | None = None, **options: Any
    ) -> SweepSummary:
        """Sweep, then publish the figures if Prometheus export is configured.

        Every entry point uses this: :meth:`cleanup`, the sweep task and the CLI.
        """
        summary = sweep(self, progress=progress, **options)
        port = self._setting("perkey_prometheus_port")
        textfile = self._setting("perkey_prometheus_textfile")
        if (port or textfile) and not summary.skipped_locked:
            from .metrics import collect_stats, export_prometheus, serve_prometheus

            if port:
                serve_prometheus(int(port))
            export_prometheus(collect_stats(self), summary, textfile=textfile)
        return summary

    def stats(self, sample_limit: int = 100_000) -> KeyStats:
        """Key metrics: counts by kind, TTL histogram, TTL-less keys, sampled sizes."""
        from .metrics import collect_stats

        return collect_stats(self, sample_limit=sample_limit)

    def cleanup(self) -> None:
        """Run the sweep; Celery's ``celery.backend_cleanup`` task calls this."""
        self.run_sweep()

    # -- connection -------------------------------------------------------------------

    @cached_property
    def client(self) -> redis.Redis:
        return client_for(self._redis_url, self._connection_kwargs, self._transport_options)

    def _script(self, source: str) -> Script:
        """The registered form of one of the scripts in :mod:`.keys` (EVALSHA, then EVAL)."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        return script

    def _errors(self, where: str, key: str | None = None) -> Any:
        return redis_errors(where, self._redis_url, key)

    def queue_script(
        self, pipe: Any, source: str, script_keys: list[str], args: Iterable[Any] = ()
    ) -> None:
        """Queue one of our scripts in ``pipe`` as a bare EVALSHA.

        redis-py would otherwise send SCRIPT EXISTS ahead of every such pipeline, one more
        round trip each time; :meth:`pipelined` loads the scripts if a server lacks them.
        """
        pipe.evalsha(self._script(source).sha, len(script_keys), *script_keys, *args)

    def pipelined(
        self,
        build: Callable[[Any], None],
        where: str,
        key: str | None = None,
        raise_on_error: bool = True,
        on: redis.Redis | None = None,
    ) -> list[Any]:
        """Run the commands ``build`` queues as one pipelined round trip.

        A server that lacks one of our scripts (a promoted replica, a flushed script
        cache) gets them all loaded, and the pipeline runs once more: every command in
        it is safe to repeat. On a cluster the pipeline is split per node, but it may
        not hold scripts: those go through ``on``, the one node that holds their keys.
        """
        target = on if on is not None else self.client
        for attempt in (1, 2):
            with self._errors(where, key), target.pipeline(transaction=False) as pipe:
                build(pipe)
                try:
                    replies: list[Any] = pipe.execute(raise_on_error=raise_on_error)
                except redis.exceptions.NoScriptError:
                    replies = [redis.exceptions.NoScriptError()]
                if attempt == 1 and any(
                    isinstance(r, redis.exceptions.NoScriptError) for r in replies
                ):
                    for source in list(self._scripts):
                        target.script_load(source)
                    continue
                return replies
        raise AssertionError("unreachable")  # pragma: no cover

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        return isinstance(exc, BackendUnavailableError)

    def _retrying(self, func: Callable[[], Any], what: str) -> Any:
        """Run ``func``, retrying lost connections by ``retry_policy``."""
        policy = self.retry_policy
        max_retries = policy.get("max_retries")
        interval = float(policy.get("interval_start", 0))
        retries = 0
        while True:
            try:
                return func()
            except BackendUnavailableError as exc:
                if max_retries is not None and retries >= max_retries:
                    raise
                retries += 1
                logger.warning(
                    "perkey: %s failed (%s); retry %d/%s in %.2fs",
                    what,
                    exc,
                    retries,
                    max_retries if max_retries is not None else "inf",
                    interval,
                )
                time.sleep(interval)
                interval = min(
                    interval + float(policy.get("interval_step", 1)),
                    float(policy.get("interval_max", 1)),
                )

    def as_uri(self, include_password: bool = False) -> str:
        url = self.url or self._redis_url
        return url if include_password else mask_url(url)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.as_uri()}>"

    def __reduce__(self, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {}, url=self.url, expires=self.expires)
        return super().__reduce__(args, kwargs)

    # -- keys -------------------------------------------------------------------------

    def get_key_for_task(self, task_id: str, key: str = "") -> str:
        if not task_id:
            raise ValueError(f"task_id must not be empty. Got {task_id!r} instead.")
        return self.layout.result(str(task_id)) + key

    def get_key_for_group(self, group_id: str, key: str = "") -> str:
        if not group_id:
            raise ValueError(f"group_id must not be empty. Got {group_id!r} instead.")
        return self.layout.group(str(group_id)) + key

    # -- plain key/value (saved groups) -----------------------------------------------

    def get(self, key: str) -> bytes | None:
        with self._errors("read", key):
            return self.client.get(key)  # type: ignore[no-any-return]

    def set(self, key: str, value: bytes | str) -> None:
        ttl = self._ttl_ms(self.expires)

        def write() -> None:
            with self._errors("write", key):
                self.client.set(key, value, px=ttl or None)

        self._retrying(write, f"write of {key!r}")

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete(key)

    @staticmethod
    def _ttl_ms(seconds: float | None) -> int:
        return int(seconds * 1000) if seconds and seconds > 0 else 0

    # -- storing ----------------------------------------------------------------------

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        task_id = str(task_id)
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = task_id
        payload = self.encode(meta)
        if len(payload) > self.max_result_bytes:
            raise BackendStoreError(
                f"result of task {task_id!r} is {len(payload)} bytes encoded, over "
                f"perkey_max_result_bytes={self.max_result_bytes}",
                state=state,
                task_id=task_id,
            )
        letter = keys.READY_LETTERS.get(state, "") if state in states.READY_STATES else ""
        expires = self.failure_expires if state == states.FAILURE else self.expires
        rkey = self.layout.result(task_id)
        ttl_ms = self._ttl_ms(expires)
        grace = min(ttl_ms, PROGRESS_GRACE_MS) if ttl_ms else PROGRESS_GRACE_MS
        args = [letter, payload, ttl_ms, PROGRESS_HISTORY, grace]

        store_keys = [rkey, self.layout.progress(task_id)]
        where = f"store result of task {task_id!r}"

        def write() -> None:
            if not self.min_replicas:
                with self._errors(where, rkey):
                    self._script(keys.STORE)(keys=store_keys, args=args)
                return

            # WAIT counts the replicas that have this connection's writes, so the
            # script and WAIT share one connection to the key's primary.
            def build(pipe: Any) -> None:
                self.queue_script(pipe, keys.STORE, store_keys, args)
                pipe.execute_command("WAIT", self.min_replicas, self.min_replicas_timeout)

            with self._errors(where, rkey):
                primary = node_client(self.client, rkey)
            acked = int(self.pipelined(build, where, rkey, on=primary)[1])
            if acked < self.min_replicas:
                raise BackendUnavailableError(
                    f"{where}: {acked} of {self.min_replicas} replicas acknowledged it "
                    f"within {self.min_replicas_timeout} ms (perkey_min_replicas)"
                )

        self._retrying(write, f"store of task {task_id!r}")
        return result

    def _forget(self, task_id: str) -> None:
        task_id = str(task_id)
        self._prefetched.pop(task_id, None)
        doomed = [self.layout.result(task_id), self.layout.progress(task_id)]

        if self.legacy_fallback:
            doomed.append(self.layout.legacy(task_id))

        def build(pipe: Any) -> None:
            for key in doomed:  # one by one: the legacy key lives in another slot
                pipe.delete(key)

        self.pipelined(build, f"forget task {task_id!r}", doomed[0])

    # -- reading ----------------------------------------------------------------------

    def _decode_ready(self, task_id: str, key: str, element: bytes) -> Meta:
        try:
            record = keys.parse_ready(element)
            return self._decode_meta(record.payload)
        except Exception as exc:
            raise CorruptResultError(task_id, key, _describe(exc)) from exc

    def _decode_legacy(self, task_id: str, raw: bytes) -> Meta:
        try:
            return self._decode_meta(raw)
        except Exception as exc:
            raise CorruptResultError(task_id, self.layout.legacy(task_id), _describe(exc)) from exc

    def _decode_progress(self, task_id: str, fields: Mapping[bytes, bytes]) -> Meta:
        try:
            return self._decode_meta(fields[keys.FIELD_META])
        except Exception as exc:
            raise CorruptResultError(
                task_id, self.layout.progress(task_id), _describe(exc)
            ) from exc

    def _decode_meta(self, payload: bytes) -> Meta:
        meta = self.decode(payload)
        if not isinstance(meta, dict) or "status" not in meta:
            raise ValueError(f"expected a result meta with a status, got {type(meta).__name__}")
        return self.meta_from_decoded(meta)  # type: ignore[no-any-return]

    def _read_state(self, task_id: str) -> Meta | None:
        """The latest stored state of one task, in one round trip; ``None`` if none."""
        rkey, pkey = self.layout.result(task_id), self.layout.progress(task_id)

        def build(pipe: Any) -> None:
            pipe.lindex(rkey, 0)
            pipe.xrevrange(pkey, count=1)
            if self.legacy_fallback:
                pipe.get(self.layout.legacy(task_id))

        replies = self.pipelined(build, f"read result of task {task_id!r}", rkey)
        ready, latest = replies[0], replies[1]
        if ready is not None:
            return self._decode_ready(task_id, rkey, ready)
        if latest and keys.FIELD_META in latest[0][1]:
            return self._decode_progress(task_id, latest[0][1])
        if self.legacy_fallback and replies[2] is not None:
            return self._decode_legacy(task_id, replies[2])
        return None

    def _get_task_meta_for(self, task_id: str) -> Meta:
        meta = self._read_state(str(task_id))
        if meta is None:
            return {"status": states.PENDING, "result": None}
        return meta

    def task_result_exists(self, task_id: str) -> bool:
        return self._read_state(str(task_id)) is not None

    def _fetch_one(self, task_id: str, consume: bool) -> Meta | None:
        """One task's ready result: one command, and a second for the legacy key only
        when there is no result of ours (a wait follows then anyway)."""
        rkey = self.layout.result(task_id)
        legacy = None
        with self._errors(f"read result of task {task_id!r}", rkey):
            if consume:
                element = self._script(keys.TAKE)(keys=[rkey, self.layout.progress(task_id)])
            else:
                element = self.client.lindex(rkey, 0)
            if element is None and self.legacy_fallback:
                legacy = self.client.get(self.layout.legacy(task_id))
        if element is not None:
            return self._decode_ready(task_id, rkey, element)
        if legacy is not None:
            meta = self._decode_legacy(task_id, legacy)
            if meta["status"] in states.READY_STATES:
                return meta
        return None

    def _fetch_ready(self, task_ids: Iterable[str], consume: bool) -> dict[str, Meta]:
        """Every ready result among ``task_ids``, in one pipelined round trip (per node)."""
        ids = list(task_ids)
        if len(ids) <= 1:
            single = {task_id: self._fetch_one(task_id, consume) for task_id in ids}
            return {task_id: meta for task_id, meta in single.items() if meta is not None}
        if not (consume and isinstance(self.client, redis.RedisCluster)):
            return self._fetch_many(ids, consume, self.legacy_fallback)
        # A cluster pipeline refuses the TAKE script: one pipeline per primary instead,
        # then the legacy keys (in other slots) for what was not there.
        by_node: dict[int, tuple[redis.Redis, list[str]]] = {}
        with self._errors("read results", None):
            for task_id in ids:
                node = node_client(self.client, self.layout.result(task_id))
                by_node.setdefault(id(node), (node, []))[1].append(task_id)
        found: dict[str, Meta] = {}
        for node, group in by_node.values():
            found.update(self._fetch_many(group, True, False, on=node))
        rest = [task_id for task_id in ids if task_id not in found]
        if self.legacy_fallback and rest:
            found.update(self._fetch_many(rest, False, True))
        return found

    def _fetch_many(
        self, ids: list[str], consume: bool, legacy: bool, on: redis.Redis | None = None
    ) -> dict[str, Meta]:
        def build(pipe: Any) -> None:
            for task_id in ids:
                rkey = self.layout.result(task_id)
                if consume:
                    self.queue_script(pipe, keys.TAKE, [rkey, self.layout.progress(task_id)])
                else:
                    pipe.lindex(rkey, 0)
                if legacy:
                    pipe.get(self.layout.legacy(task_id))

        replies = self.pipelined(build, "read results", None, raise_on_error=False, on=on)
        found: dict[str, Meta] = {}
        step = 2 if legacy else 1
        for i, task_id in enumerate(ids):
            element = replies[i * step]
            if isinstance(element, redis.ResponseError):
                with self._errors(f"read result of task {task_id!r}", self.layout.result(task_id)):
                    raise element
            if element is not None:
                found[task_id] = self._decode_ready(task_id, self.layout.result(task_id), element)
                continue
            old = replies[i * step + 1] if legacy else None
            if old is not None and not isinstance(old, Exception):
                meta = self._decode_legacy(task_id, old)
                if meta["status"] in states.READY_STATES:
                    found[task_id] = meta
        return found

    # -- waiting ----------------------------------------------------------------------

    def add_pending_result(self, result: Any, weak: bool = False) -> Any:
        result_id = getattr(result, "id", None)
        if result_id is not None and not hasattr(result, "results"):
            self._pending[str(result_id)] = result
        return result

    def remove_pending_result(self, result: Any) -> Any:
        self._pending.pop(str(result.id), None)
        return result

    def wait_for_pending(
        self,
        result: Any,
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_message: Callable[[Meta], Any] | None = None,
        on_interval: Callable[[], Any] | None = None,
        callback: Callable[..., Any] | None = None,
        propagate: bool = True,
    ) -> Any:
        self._ensure_not_eager()
        task_id = str(result.id)
        try:
            if on_message is not None:
                meta = self._wait_with_messages(task_id, timeout, on_message, on_interval)
            else:
                prefetched = self._prefetched.pop(task_id, None)
                meta = prefetched or self._wait_ready(task_id, timeout, on_interval)
        finally:
            self.remove_pending_result(result)
        result._maybe_set_cache(meta)
        return result.maybe_throw(propagate=propagate, callback=callback)

    def wait_for(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_interval: Callable[[], Any] | None = None,
    ) -> Meta:
        """Block until the task is ready and return its meta.

        Raises
        ------
        celery.exceptions.TimeoutError
            If ``timeout`` passes first.
        """
        self._ensure_not_eager()
        return self._wait_ready(str(task_id), timeout, on_interval)

    def _prefetch(self, task_id: str) -> Meta | None:
        """Read ``task_id`` together with the other pending results of this thread.

        A ``join()`` then costs one round trip for everything already stored. Only a
        SUCCESS is kept for later: it is final, so it cannot go stale.
        """
        others = [tid for tid in list(self._pending.keys()) if tid != task_id]
        for stale in set(self._prefetched) - set(others):
            del self._prefetched[stale]
        batch = [task_id, *others[: PREFETCH_LIMIT - 1]]
        found = self._fetch_ready(batch, consume=False)
        for tid, meta in found.items():
            if tid != task_id and meta["status"] == states.SUCCESS:
                self._prefetched[tid] = meta
        return found.get(task_id)

    def _wait_ready(
        self, task_id: str, timeout: float | None, on_interval: Callable[[], Any] | None
    ) -> Meta:
        deadline = Deadline(timeout)
        rkey = self.layout.result(task_id)
        if self.read_once:
            meta = self._fetch_ready([task_id], consume=True).get(task_id)
        else:
            meta = self._prefetch(task_id)
        if meta is not None:
            return meta
        return self._block_until_ready(task_id, rkey, deadline, on_interval)

    def _block_until_ready(
        self,
        task_id: str,
        rkey: str,
        deadline: Deadline,
        on_interval: Callable[[], Any] | None,
    ) -> Meta:
        failures = 0
        overran = False
        while not deadline.expired:
            try:
                with self._errors(f"wait for task {task_id!r}", rkey):
                    element = self._blocker.pop(
                        self.client, rkey, deadline.block_for(self._block_cap)
                    )
            except BackendUnavailableError as exc:
                # A busy server can answer a block's end a little past the socket
                # timeout; that alone is no lost connection. Twice in a row is.
                if isinstance(exc.__cause__, redis.TimeoutError) and not overran:
                    overran = True
                    continue
                failures = self._pause_after_failure(failures, task_id, exc)
                continue
            failures = 0
            overran = False
            if element is not None:
                if self.read_once:
                    # Taken: its progress history goes too, so nothing is left behind.
                    with self._errors(f"wait for task {task_id!r}", rkey):
                        self.client.unlink(self.layout.progress(task_id))
                return self._decode_ready(task_id, rkey, element)
            if on_interval:
                on_interval()
            if self.legacy_fallback:
                meta = self._fetch_ready([task_id], consume=self.read_once).get(task_id)
                if meta is not None:
                    return meta
        raise TimeoutError(f"The operation timed out waiting for task {task_id!r}.")

    def _pause_after_failure(self, failures: int, task_id: str, exc: Exception) -> int:
        """Back off after a lost connection mid-wait; give up past ``max_retries``."""
        max_retries = self.retry_policy.get("max_retries")
        if max_retries is not None and failures >= max_retries:
            raise exc
        if failures == 0:
            logger.warning("perkey: connection lost while waiting for task %r; retrying", task_id)
        time.sleep(min(float(self.retry_policy.get("interval_max", 1)), 0.1 * 2**failures))
        return failures + 1

    def _wait_with_messages(
        self,
        task_id: str,
        timeout: float | None,
        on_message: Callable[[Meta], Any],
        on_interval: Callable[[], Any] | None,
    ) -> Meta:
        """Wait, handing ``on_message`` the current state and then each new one.

        Intermediate states are read from the task's progress stream with a blocking
        XREAD; the ready write adds a marker entry there, which ends the wait.
        """
        deadline = Deadline(timeout)
        rkey, pkey = self.layout.result(task_id), self.layout.progress(task_id)
        ttl = self._ttl_ms(self.expires)
        consume = "1" if self.read_once else "0"
        last: bytes = b"0-0"
        first = True
        while True:
            with self._errors(f"wait for task {task_id!r}", rkey):
                ready, entries = self._script(keys.WATCH)(
                    keys=[rkey, pkey], args=[last, ttl, consume]
                )
            if ready:
                meta = self._decode_ready(task_id, rkey, ready)
                on_message(meta)
                return meta
            metas = []
            for entry_id, fields in _pairs(entries):
                last = entry_id
                if keys.FIELD_META in fields:
                    metas.append(self._decode_progress(task_id, fields))
            if first:
                # Like redis://, start with the current state, PENDING included.
                first = False
                legacy = self._fetch_ready([task_id], False) if self.legacy_fallback else {}
                if task_id in legacy:
                    on_message(legacy[task_id])
                    return legacy[task_id]
                metas = metas[-1:] or [{"status": states.PENDING, "result": None}]
            for meta in metas:
                on_message(meta)
            if deadline.expired:
                raise TimeoutError(f"The operation timed out waiting for task {task_id!r}.")
            block = deadline.block_for(self._block_cap)
            with self._errors(f"wait for task {task_id!r}", pkey):
                news = blocking_call(
                    self.client, pkey, block, "XREAD", "BLOCK", max(1, int(block * 1000)),
                    "STREAMS", pkey, last,
                )  # fmt: skip
            if not news and on_interval:
                on_interval()
            # Whatever arrived is read again by the script, from ``last`` on.

    def get_many(
        self,
        task_ids: Iterable[str],
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_message: Callable[[Meta], Any] | None = None,
        on_interval: Callable[[], Any] | None = None,
        max_iterations: int | None = None,
        READY_STATES: frozenset[str] = states.READY_STATES,
    ) -> Iterator[tuple[str, Meta]]:
        """Yield ``(task_id, meta)`` for each task as it is ready.

        Everything already stored comes from one pipelined round trip; then the wait
        blocks on one missing result at a time under one overall deadline, and reads
        all the others again, in one round trip, each time one arrives.
        """
        deadline = Deadline(timeout)
        missing = list(dict.fromkeys(str(t) for t in task_ids))
        cached = [tid for tid in missing if tid in self._cache]
        for tid in cached:
            yield tid, self._cache[tid]
        missing = [tid for tid in missing if tid not in self._cache]
        while missing:
            found = self._fetch_ready(missing, consume=self.read_once)
            for tid, meta in found.items():
                self._cache[tid] = meta
                if on_message is not None:
                    on_message(meta)
                yield tid, meta
            missing = [tid for tid in missing if tid not in found]
            if not missing or max_iterations:
                return
            if deadline.expired:
                raise TimeoutError(f"Operation timed out ({timeout})")
            head = missing[0]
            meta = self._block_until_ready(head, self.layout.result(head), deadline, on_interval)
            self._cache[head] = meta
            if on_message is not None:
                on_message(meta)
            yield head, meta
            missing.pop(0)

    # -- chords -----------------------------------------------------------------------

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        _, skey, _, ckey, _ = self.layout.chord_keys(group_id)
        args = [int(chord_size), self._ttl_ms(self.chord_expires)]

        def write() -> None:
            with self._errors(f"set size of chord {group_id!r}", skey):
                self._script(keys.CHORD_SIZE)(keys=[skey, ckey], args=args)

        self._retrying(write, f"chord size of {group_id!r}")

    def add_to_chord(self, group_id: str, result: Any) -> None:
        tkey = self.layout.chord(group_id, "t")
        with self._errors(f"add to chord {group_id!r}", tkey):
            self.client.incr(tkey)

    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        # A header holding groups must be joined with its structure intact when the
        # chord completes, so save it; a flat header is rebuilt from the chord's list.
        if isinstance(header_result_args[1], _regen):
            return
        header = self.app.GroupResult(*header_result_args)
        if any(isinstance(member, GroupResult) for member in header.results):
            key = self.get_key_for_group(header.id)
            value = self.encode({"result": header.as_tuple()})
            ttl = self._ttl_ms(self._chord_result_expires)

            def write() -> None:
                with self._errors(f"save chord header {header.id!r}", key):
                    self.client.set(key, value, px=ttl or None)

            self._retrying(write, f"chord header of {header.id!r}")

    def on_chord_part_return(
        self, request: Any, state: str, result: Any, propagate: Any = None, **kwargs: Any
    ) -> None:
        task_id, group_id = request.id, request.group
        if not task_id or not group_id:
            return
        index = "+inf" if request.group_index is None else request.group_index
        encoded = self.encode([1, task_id, state, self.encode_result(result, state)])
        chord_keys = self.layout.chord_keys(group_id)
        join_timeout = self.app.conf.result_chord_join_timeout or 5.0
        claim_ttl = max(5, int(join_timeout * 2))
        token = uuid.uuid4().hex
        args = [
            task_id,
            encoded,
            "1" if self.chord_ordered else "0",
            index,
            int(self.chord_expires or 0),
            int(self._chord_result_expires or 0),
            claim_ttl,
            token,
        ]
        with self._errors(f"chord part of {group_id!r}", chord_keys[0]):
            _, total, claimed = self._script(keys.CHORD_PART)(
                keys=[*chord_keys, self.get_key_for_group(group_id)], args=args
            )
        if not claimed:
            return
        callback = maybe_signature(request.chord, app=self.app)
        try:
            values = self._chord_header_values(group_id, chord_keys[0], int(total))
            callback.delay(values)
        except ChordError as exc:
            logger.exception("Chord %r raised: %r", group_id, exc)
            self.chord_error_from_stack(callback, exc)
        except Exception as exc:
            logger.exception("Chord %r raised: %r", group_id, exc)
            error = ChordError(f"Join error: {exc!r}")
            error.__cause__ = exc
            self.chord_error_from_stack(callback, error)
        finally:
            with self._errors(f"finish chord {group_id!r}", chord_keys[3]):
                self._script(keys.CHORD_DONE)(
                    keys=chord_keys, args=[token, max(claim_ttl * 2, 300)]
                )

    def _chord_header_values(self, group_id: str, jkey: str, total: int) -> list[Any]:
        saved = GroupResult.restore(group_id, backend=self, app=self.app)
        if saved is not None:
            saved.on_ready()
            with allow_join_result():
                values: list[Any] = saved.join_native(
                    timeout=self.app.conf.result_chord_join_timeout, propagate=True
                )
            return values
        with self._errors(f"read chord {group_id!r}", jkey):
            if self.chord_ordered:
                raw = self.client.zrange(jkey, 0, -1)
            else:
                raw = self.client.lrange(jkey, 0, total - 1)
        return [self._unpack_chord_part(item) for item in raw]

    def _unpack_chord_part(self, item: bytes) -> Any:
        _, task_id, state, value = self.decode(item)
        if state in states.EXCEPTION_STATES:
            value = self.exception_to_python(value)
        if state in states.PROPAGATE_STATES:
            error = ChordError(f"Dependency {task_id} raised {value!r}")
            error.__cause__ = value if isinstance(value, BaseException) else None
            raise error
        return value


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _pairs(entries: Any) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    """Stream entries as the script returns them: ``[id, [field, value, ...]]``."""
    for entry_id, flat in entries or ():
        yield entry_id, dict(zip(flat[::2], flat[1::2], strict=False))
