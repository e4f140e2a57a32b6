"""The Celery result backend: Celery's protocol over the byte-level result store.

Data flows one way: this class encodes Celery's meta, the store writes the bytes, the
waiter blocks on the store, the store hands bytes back, and this class decodes them.
Adopted by configuration alone::

    result_backend = "perkey://:password@host:6379/0"
"""

from __future__ import annotations

import functools
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import redis
from celery import states
from celery.backends.base import KeyValueStoreBackend
from celery.exceptions import BackendStoreError
from celery.result import result_from_tuple

from .chords import ChordCoordinator
from .connection import deadline_in_force
from .deadline import Deadline
from .errors import BackendUnavailableError, CorruptResultError, quote_id
from .keys import READY_LETTERS, KeyLayout, parse_ready
from .legacy import fallbacks
from .prometheus import sweep_and_publish
from .settings import Settings
from .stats import KeyStats, collect_stats
from .store import Record, ResultStore
from .sweep import SweepSummary
from .tasks import register_sweep_task
from .urls import mask_url
from .waiting import PARENT_CHECK, Waiter, within_deadline

__all__ = ["PREFETCH_LIMIT", "JoinPrefetch", "PerkeyBackend"]

Meta = dict[str, Any]

#: The most pending results one prefetch asks for in its pipeline.
PREFETCH_LIMIT = 5000


def _ms(seconds: float | None) -> int:
    return int(seconds * 1000) if seconds and seconds > 0 else 0


class JoinPrefetch:
    """The results one thread's callers hold but have not collected yet (a result set
    registers its members through ``then()``), so that the first ``get()`` of a
    ``join()`` reads them all in one round trip. Only SUCCESSes are kept for later:
    they are final, so they cannot go stale.

    Each thread has its own: with ``result_backend_thread_safe`` Celery shares one
    backend among the app's threads, and the results a thread holds stay its own.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def pending(self) -> weakref.WeakValueDictionary[str, Any]:
        """This thread's results not collected yet, by task id."""
        found: weakref.WeakValueDictionary[str, Any] | None = getattr(self._local, "pending", None)
        if found is None:
            found = self._local.pending = weakref.WeakValueDictionary()
        return found

    @property
    def kept(self) -> dict[str, Meta]:
        """This thread's SUCCESSes read along, not asked for yet."""
        found: dict[str, Meta] | None = getattr(self._local, "kept", None)
        if found is None:
            found = self._local.kept = {}
        return found

    def others(self, task_id: str) -> list[str]:
        """The other pending ids, at most :data:`PREFETCH_LIMIT` with ``task_id``; what
        was kept for ids no longer pending goes."""
        others = [tid for tid in list(self.pending.keys()) if tid != task_id]
        for stale in set(self.kept) - set(others) - {task_id}:
            del self.kept[stale]
        return others[: PREFETCH_LIMIT - 1]

    def read(
        self, task_id: str, fetch: Callable[[list[str]], dict[str, Meta]], read_once: bool
    ) -> Meta | None:
        """``task_id``'s meta if kept, else as ``fetch`` finds it, reading the other
        pending ids along (not when read-once: a take consumes what it reads)."""
        kept = self.kept.pop(task_id, None)
        if kept is not None:
            return kept
        others = [] if read_once else self.others(task_id)
        return self.keep(task_id, fetch([task_id, *others]))

    def keep(self, task_id: str, found: dict[str, Meta]) -> Meta | None:
        """Keep the SUCCESSes among ``found`` for later; ``task_id``'s meta, if found."""
        for tid, meta in found.items():
            if tid != task_id and meta["status"] == states.SUCCESS:
                self.kept[tid] = meta
        return found.get(task_id)


def _results_with_deadlines(app: Any) -> None:
    """Make ``get()`` of ``app``'s results run wholly under its timeout.

    Celery's ``AsyncResult.get()`` checks a chain's parents (reads them) before it
    hands the timeout to the backend; on a stalled link that read would wait for the
    whole socket timeout. The result class Celery makes for each app (``app.AsyncResult``:
    tasks, chains and restored results are made of it, also before the backend exists)
    gets a ``get()`` that starts the deadline first and runs Celery's under it, so
    that check ends by the deadline too. A class the app did not make for itself
    (one that is shared) is left as it is.
    """
    cls = app.AsyncResult
    if vars(cls).get("app") is not app or getattr(cls.get, "perkey_deadline", False):
        return
    celery_get = cls.get

    def get(self: Any, timeout: float | None = None, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(self.backend, PerkeyBackend):
            return celery_get(self, timeout, *args, **kwargs)
        deadline = Deadline(timeout)  # a bad timeout is refused before anything is read
        return within_deadline(
            deadline, str(self.id), lambda: celery_get(self, timeout, *args, **kwargs)
        )

    get.__doc__ = celery_get.__doc__
    get.perkey_deadline = True  # type: ignore[attr-defined]
    cls.get = get


class PerkeyBackend(KeyValueStoreBackend):  # type: ignore[misc]
    """Celery result backend keeping each task's result in its own Redis list.

    Parameters
    ----------
    app:
        The Celery app; every setting is read from ``app.conf``, once.
    url:
        The backend URL after Celery removed ``perkey+`` (``perkey://`` arrives whole).

    Raises
    ------
    ConfigurationError
        If a setting or the URL is wrong; the message names it.
    """

    supports_native_join = True
    # False makes celery beat schedule Celery's own celery.backend_cleanup (daily),
    # which calls cleanup(): the sweep.
    supports_autoexpire = False
    supports_result_compression = True
    supports_failure_expires = True

    def __init__(self, app: Any, url: str | None = None, **kwargs: Any) -> None:
        self.settings = settings = Settings.from_conf(app.conf, url)
        kwargs.setdefault("expires", settings.result_expires_s or 0)
        kwargs.setdefault("expires_type", float)
        super().__init__(app=app, url=url, **kwargs)
        # The store retries by the one policy (Celery's always-retry settings when they
        # are on); Celery's own loop around it only turns the last error into its own.
        self.max_retries = 0
        self.url = url
        self.store = ResultStore(settings, *fallbacks(settings))
        self.waiter = Waiter(self.store, multiplex=settings.multiplexed)
        self.chords = ChordCoordinator(self.store, self)
        self.prefetch = JoinPrefetch()
        register_sweep_task(self.app)
        _results_with_deadlines(self.app)

    @property
    def layout(self) -> KeyLayout:
        return self.store.layout

    @property
    def client(self) -> redis.Redis:
        """The redis-py client, shared by every backend of this process and URL."""
        return self.store.client

    def as_uri(self, include_password: bool = False) -> str:
        url = self.settings.url
        return url if include_password else mask_url(url)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.as_uri()}>"

    def __reduce__(self, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {}, url=self.url, expires=self.expires)
        return super().__reduce__(args, kwargs)

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        return isinstance(exc, BackendUnavailableError)

    # -- the sweep and the figures ----------------------------------------------------

    def run_sweep(
        self, progress: Callable[[int, int], None] | None = None, **options: Any
    ) -> SweepSummary:
        """Sweep, repairing stalled chords (the chord coordinator publishes their bodies),
        then record it for Prometheus if export is configured.

        Every entry point uses this: :meth:`cleanup`, the sweep task and the CLI.
        """
        return sweep_and_publish(self.store, progress, repair=self.chords.repair, **options)

    def stats(self, sample_limit: int = 100_000) -> KeyStats:
        """Key metrics: counts by kind, TTL histogram, TTL-less keys, sampled sizes."""
        return collect_stats(self.store, sample_limit=sample_limit)

    def cleanup(self) -> None:
        """Run the sweep; Celery's ``celery.backend_cleanup`` task calls this."""
        self.run_sweep()

    def close(self) -> None:
        """Stop this process's multiplexer for the backend's server: its threads end and
        its connections close; waits still running through it fail with
        ``BackendUnavailableError``. A later wait starts a new one."""
        self.waiter.close()

    # -- keys and plain values (saved groups) -----------------------------------------

    def get_key_for_task(self, task_id: str, key: str = "") -> str:
        if not task_id:
            raise ValueError(f"task_id must not be empty. Got {quote_id(task_id)} instead.")
        return self.layout.result(str(task_id)) + key

    def get_key_for_group(self, group_id: str, key: str = "") -> str:
        if not group_id:
            raise ValueError(f"group_id must not be empty. Got {quote_id(group_id)} instead.")
        return self.layout.group(str(group_id)) + key

    def get(self, key: str) -> bytes | None:
        return self.store.get(key)

    def set(self, key: str, value: bytes | str) -> None:
        self.store.set(key, value, _ms(self.settings.result_expires_s))

    def delete(self, key: str) -> None:
        self.store.delete(key)

    def _restore_group(self, group_id: str) -> Meta | None:
        raw = self.store.read_group(str(group_id))  # ours, else one that redis:// saved
        meta: Meta | None = None if raw is None else self.decode(raw)
        if meta is not None:
            meta["result"] = result_from_tuple(meta["result"], self.app)
        return meta

    def _delete_group(self, group_id: str) -> None:
        self.store.forget_group(str(group_id))

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
        limit = self.settings.max_result_bytes
        if len(payload) > limit:
            raise BackendStoreError(
                f"result of task {quote_id(task_id)} is {len(payload)} bytes encoded, over "
                f"perkey_max_result_bytes={limit}",
                state=state,
                task_id=task_id,
            )
        settings = self.settings
        expires = (
            settings.failure_expires_s if state == states.FAILURE else settings.result_expires_s
        )
        letter = READY_LETTERS.get(state, "") if state in states.READY_STATES else ""
        if request is not None:
            # A chord part counts before its result is stored: see chords.py.
            self.chords.part_stored(request, state, result)
        self.store.write(task_id, letter, payload, _ms(expires))
        return result

    def _forget(self, task_id: str) -> None:
        self.prefetch.kept.pop(str(task_id), None)
        self.store.forget(str(task_id))

    # -- reading ----------------------------------------------------------------------

    def decode_record(self, record: Record) -> Meta:
        """Celery's meta from stored bytes.

        Raises
        ------
        CorruptResultError
            Naming the task and the key, if the bytes are not a meta this backend can
            read (garbage, the wrong shape, or content outside ``result_accept_content``).
        """
        try:
            payload = record.payload
            if record.kind != "fallback":
                payload = parse_ready(payload).payload
            meta = self.decode(payload)
            if not isinstance(meta, dict) or "status" not in meta:
                raise ValueError(f"expected a result meta with a status, got {type(meta).__name__}")
            decoded: Meta = self.meta_from_decoded(meta)
            return decoded
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise CorruptResultError(record.task_id, record.key, reason) from exc

    def final(self, record: Record) -> Meta | None:
        """The meta of a ready result; ``None`` for an intermediate state (a multiplexed
        wait that begins while the task runs is handed its STARTED or PROGRESS first)
        and for a fallback key's unready state."""
        if record.kind == "progress":
            return None
        meta = self.decode_record(record)
        if record.kind == "fallback" and meta["status"] not in states.READY_STATES:
            return None
        return meta

    def _get_task_meta_for(self, task_id: str) -> Meta:
        record = self.store.read_state(str(task_id))
        if record is None:
            return {"status": states.PENDING, "result": None}
        return self.decode_record(record)

    def task_result_exists(self, task_id: str) -> bool:
        return self.store.read_state(str(task_id)) is not None

    def _fetch_ready(
        self, task_ids: list[str], consume: bool, token: str | None = None
    ) -> dict[str, Meta]:
        """Every ready result among ``task_ids``, in one round trip (per node); ``token``:
        one for every retry of a read-once read (see ``ResultStore.read_ready``)."""
        found = {}
        for task_id, record in self.store.read_ready(task_ids, consume, token).items():
            meta = self.final(record)
            if meta is not None:
                found[task_id] = meta
        return found

    # -- waiting ----------------------------------------------------------------------

    def add_pending_result(self, result: Any, weak: bool = False) -> Any:
        result_id = getattr(result, "id", None)
        if result_id is not None and not hasattr(result, "results"):
            self.prefetch.pending[str(result_id)] = result
        return result

    def remove_pending_result(self, result: Any) -> Any:
        self.prefetch.pending.pop(str(result.id), None)
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
        # Started by our result's get(), the deadline is in force already. A result with
        # parents has them checked (on_interval, under the deadline) once a second.
        deadline = Deadline(timeout).sooner(deadline_in_force())
        cap = PARENT_CHECK if getattr(result, "parent", None) is not None else None

        def wait() -> Meta:
            if on_message is not None:
                return self.waiter.follow(
                    task_id,
                    deadline,
                    self.decode_record,
                    on_message,
                    consume=self.settings.read_once,
                    on_step=on_interval,
                    cap=cap,
                )
            return self._wait_ready(task_id, deadline, on_interval, cap)

        try:
            meta = within_deadline(deadline, task_id, wait)
        finally:
            self.remove_pending_result(result)
        return self.settle(result, meta, propagate, callback)

    def settle(
        self,
        result: Any,
        meta: Meta,
        propagate: bool = True,
        callback: Callable[..., Any] | None = None,
    ) -> Any:
        """Give ``result`` its final meta, and answer as ``get()`` does: the value, or
        the task's exception (raised with ``propagate``)."""
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
        """Block until the task is ready and return its meta (Celery's TimeoutError
        if ``timeout`` passes first)."""
        self._ensure_not_eager()
        return self._wait_ready(str(task_id), Deadline(timeout), on_interval)

    def _wait_ready(
        self,
        task_id: str,
        deadline: Deadline,
        on_interval: Callable[[], Any] | None,
        cap: float | None = None,
    ) -> Meta:
        read_once = self.settings.read_once
        # One token for every retry of the first read's take.
        fetch = functools.partial(self._fetch_ready, consume=read_once, token=uuid.uuid4().hex)
        first = functools.partial(self.prefetch.read, task_id, fetch, read_once)
        # Through the multiplexer, registering reads the task (and concurrent waits
        # register together): no read of its own, on a connection of its own.
        return self.waiter.until_ready(
            task_id,
            deadline,
            self.final,
            first=None if self.waiter.multiplex else first,
            consume=read_once,
            on_step=on_interval,
            cap=cap,
        )

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
        """Yield ``(task_id, meta)`` for each task as it is ready: everything stored in
        one round trip, then one blocking wait at a time (see ``Waiter.each_ready``);
        ``max_iterations`` caps the reads (Celery's ``ResultSet`` asks for one)."""
        ids = list(dict.fromkeys(str(t) for t in task_ids))
        yield from ((tid, self._cache[tid]) for tid in ids if tid in self._cache)
        read_once = self.settings.read_once
        for tid, meta in self.waiter.each_ready(
            [tid for tid in ids if tid not in self._cache],
            Deadline(timeout),
            functools.partial(self._fetch_ready, consume=read_once, token=uuid.uuid4().hex),
            self.final,
            consume=read_once,
            on_step=on_interval,
            cap=PARENT_CHECK if on_interval is not None else None,
            max_reads=max_iterations,
        ):
            self._cache[tid] = meta
            if on_message is not None:
                on_message(meta)
            yield tid, meta

    # -- chords -----------------------------------------------------------------------

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        self.chords.set_size(group_id, chord_size)

    def add_to_chord(self, group_id: str, result: Any) -> None:
        self.chords.add(group_id)

    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        self.chords.start(header_result_args, body)

    def on_chord_part_return(
        self, request: Any, state: str, result: Any, propagate: Any = None, **kwargs: Any
    ) -> None:
        self.chords.part_returned(request, state, result)
