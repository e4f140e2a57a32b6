"""Chords: counting a chord's header results and publishing its body, at least once.

Each header task's result is counted, once, by one script on the chord's own keys (all
in the group's hash slot), *before* the result itself is stored: Celery acknowledges a
task whose worker died after storing its result, so that task is never run again, and
its part must already count. Until the task reports it (``on_chord_part_return``, after
the store) the part is *in flight*: its worker may still die before the store, and the
worker's main process then records the task as FAILURE (``WorkerLostError``) and
reports that. A reported failure replaces the value counted in flight, and the body is
claimed only once no part is in flight, so the body fails with ``ChordError`` whenever
a header task ends as FAILURE, as with Celery's ``redis://``.

The call that completes the count of reported parts claims the body with a deadline,
builds its arguments, records "publishing", publishes it, then records it published
("done"), so that a late duplicate cannot start it again. A part in flight whose task
has stored its result meanwhile is settled with what was stored by whichever reporter
finds it.

A claimer can die at any of these steps, and a part can stay in flight for good (its
worker died after the store, or the whole worker died before it). Past the claim's
deadline, a redelivered header task or the sweep (:meth:`ChordCoordinator.repair`)
takes the claim over, settling each part still in flight from what its task stored
(the value it was counted with if it stored nothing): at once when the claimer never
recorded "publishing" (the body was never sent), and after looking for the body's
result or progress when it had (the body may be in the broker).
So a body is published at least once, and twice only when its publisher died between
the broker accepting it and the backend recording it, and the body left no trace before
the takeover.

This is Celery's protocol over the store's chord primitives: it encodes and decodes
through the Celery backend it serves, and never touches Redis itself.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import states
from celery.canvas import maybe_signature
from celery.exceptions import ChordError
from celery.result import GroupResult, allow_join_result

from .errors import CorruptResultError, quote_id
from .store import ChordTally, Record, ResultStore

__all__ = ["ChordCoordinator", "body_task_ids"]

logger = logging.getLogger("celery_perkey_backend")


def _ms(seconds: float | None) -> int:
    return int(seconds * 1000) if seconds and seconds > 0 else 0


def body_task_ids(signature: Any) -> list[str]:
    """The ids whose result or progress shows that a published body has run.

    A task's own id; every member of a group; a chain's first task; a chord's header
    tasks. Empty when none is known (then nothing can show it).
    """
    signature = maybe_signature(signature)
    kind = signature.get("subtask_type")
    tasks = getattr(signature, "tasks", None) or ()
    if kind in ("group", "chord"):
        return [tid for task in tasks for tid in body_task_ids(task)]
    if kind == "chain":
        return body_task_ids(tasks[0]) if tasks else []
    task_id = signature.options.get("task_id")
    return [str(task_id)] if task_id else []


class ChordCoordinator:
    """Runs Celery's chord protocol on the store.

    Parameters
    ----------
    store:
        Where the chord's keys are.
    backend:
        The Celery backend whose encoding, joins and error reporting the chord uses.
    """

    def __init__(self, store: ResultStore, backend: Any) -> None:
        self.store = store
        self.backend = backend

    @property
    def _claim_ttl_ms(self) -> int:
        return max(1, int(self.store.settings.chord_claim_ttl_s * 1000))

    @property
    def _marker_ttl_ms(self) -> int:
        return max(self._claim_ttl_ms * 2, 300_000)

    def set_size(self, group_id: str, size: int) -> None:
        self.store.chord_size(group_id, int(size), _ms(self.store.settings.chord_expires_s))

    def add(self, group_id: str) -> None:
        self.store.chord_add(group_id)

    def start(self, header_result_args: Any, body: Any) -> None:
        """Keep what a repair needs: the body, and a header that holds groups.

        The body is kept as its task id and signature, so that the sweep can publish it
        (or fail it) when every worker that could have done so died. A flat header is
        rebuilt from the chord's own list; one that holds groups is saved, so that it is
        joined with its structure intact.
        """
        backend = self.backend
        group_id = str(header_result_args[0])
        body_id = body.id if body is not None else None
        try:
            payload = backend.encode({"id": body_id, "signature": dict(body)})
        except Exception as exc:  # a signature the result serializer cannot carry
            payload = backend.encode({"id": body_id, "signature": None, "error": repr(exc)})
        self.store.chord_save_body(group_id, payload, _ms(self.store.settings.chord_expires_s))
        # Celery hands a plain list, or for a generator header a lazy list subclass that
        # reading here would consume before the header is sent.
        if type(header_result_args[1]) is not list:
            return
        header = backend.app.GroupResult(*header_result_args)
        if any(isinstance(member, GroupResult) for member in header.results):
            self.store.set(
                backend.get_key_for_group(header.id),
                backend.encode({"result": header.as_tuple()}),
                _ms(self.store.settings.chord_result_expires_s),
                what=f"save chord header {quote_id(header.id)}",
            )

    # -- header results ---------------------------------------------------------------

    def part_stored(self, request: Any, state: str, result: Any) -> None:
        """Count a header result just before it is stored (``_store_result``)."""
        if state in states.READY_STATES:
            self._record(request, state, result, take=False)

    def part_returned(self, request: Any, state: str, result: Any) -> None:
        """Count one header result; the call that completes the chord runs its body.

        A failure replaces the value the part was counted with before its store (its
        worker died before storing it: the store never happened).
        """
        token = uuid.uuid4().hex
        final = state in states.PROPAGATE_STATES
        tally = self._record(request, state, result, take=True, token=token, final=final)
        if tally is not None and tally.in_flight:
            tally = self._settle(request.group, token, lost=False) or tally
        if tally is None or not (tally.claimed or tally.stale is not None):
            return
        group_id = request.group
        callback = maybe_signature(request.chord, app=self.backend.app)
        if tally.stale is not None and not self._take_over(group_id, callback, tally.stale, token):
            return
        self._dispatch(group_id, callback, token, tally.total)

    def _record(
        self,
        request: Any,
        state: str,
        result: Any,
        take: bool,
        token: str = "",
        final: bool = False,
    ) -> ChordTally | None:
        task_id, group_id = request.id, request.group
        if not task_id or not group_id or not getattr(request, "chord", None):
            return None
        index = "+inf" if request.group_index is None else request.group_index
        value = self._encode_part(task_id, state, result)
        return self._part(group_id, task_id, value, index, take, token, final)

    def _encode_part(self, task_id: str, state: str, result: Any) -> bytes:
        backend = self.backend
        encoded: bytes = backend.encode([1, task_id, state, backend.encode_result(result, state)])
        return encoded

    def _part(
        self,
        group_id: str,
        task_id: str,
        value: bytes,
        index: str | int,
        take: bool,
        token: str = "",
        final: bool = False,
    ) -> ChordTally:
        settings = self.store.settings
        return self.store.chord_part(
            group_id,
            task_id,
            value,
            index,
            _ms(settings.chord_expires_s),
            _ms(settings.chord_result_expires_s),
            self._claim_ttl_ms,
            token or uuid.uuid4().hex,
            take=take,
            final=final,
        )

    def _settle(self, group_id: str, token: str, lost: bool) -> ChordTally | None:
        """Report the parts in flight whose tasks have stored a result, with what they
        stored (a failure included); with ``lost``, also the others, with the value
        they were counted with (their tasks are taken as lost: past the claim's
        deadline). Returns the last report's tally, ``None`` when none was made."""
        parts = self.store.chord_in_flight(group_id)
        if not parts:
            return None
        found = self.store.read_ready(sorted({task_id for task_id, _ in parts}))
        tally: ChordTally | None = None
        for (task_id, index), counted in parts.items():
            meta = self._stored(found.get(task_id))
            if meta is not None:
                value = self._encode_part(task_id, meta["status"], meta["result"])
                tally = self._part(group_id, task_id, value, index, True, token, final=True)
            elif lost:
                tally = self._part(group_id, task_id, counted, index, True, token)
        return tally

    def _stored(self, record: Record | None) -> dict[str, Any] | None:
        """The ready meta of a stored record; ``None`` if there is none, or it is
        unreadable (the part then keeps the value it was counted with)."""
        if record is None:
            return None
        try:
            meta: dict[str, Any] | None = self.backend.final(record)
        except CorruptResultError as exc:
            logger.warning("Chord part %s: %s", quote_id(record.task_id), exc)
            return None
        return meta

    # -- publishing the body ----------------------------------------------------------

    def _dispatch(self, group_id: str, callback: Any, token: str, total: int) -> str:
        """Build the body's arguments and publish it under ``token``'s claim.

        Returns ``"published"``, ``"failed"`` (a ChordError was stored as the body's
        result) or ``"lost"`` (another worker took the claim over meanwhile).
        """
        backend = self.backend
        error: ChordError | None = None
        values: list[Any] = []
        try:
            self._settle(group_id, token, lost=True)
            values = self._header_values(group_id, total)
        except ChordError as exc:
            error = exc
        except Exception as exc:
            error = ChordError(f"Join error: {exc!r}")
            error.__cause__ = exc
        if not self.store.chord_publishing(group_id, token, self._claim_ttl_ms):
            logger.warning("Chord %r: another worker took over its body; leaving it", group_id)
            return "lost"
        # Celery's chord_error_from_stack reads sys.exc_info(): call it while handling.
        try:
            if error is not None:
                raise error
            callback.delay(values)
            return "published"
        except ChordError as exc:
            logger.exception("Chord %r raised: %r", group_id, exc)
            backend.chord_error_from_stack(callback, exc)
            return "failed"
        except Exception as exc:
            logger.exception("Chord %r raised: %r", group_id, exc)
            failure = ChordError(f"Join error: {exc!r}")
            failure.__cause__ = exc
            backend.chord_error_from_stack(callback, failure)
            return "failed"
        finally:
            if not self.store.chord_done(group_id, token, self._marker_ttl_ms):
                logger.warning(
                    "Chord %r: another worker took over while this one published the "
                    "body, which may run twice",
                    group_id,
                )

    def _take_over(self, group_id: str, callback: Any, seen: bytes, token: str) -> bool:
        """Take over a claimer that died while publishing; True if the body must go out.

        If the body left a trace (a result, or progress such as STARTED), it was
        published: record it so, and publish nothing.
        """
        store = self.store
        if self._body_has_run(callback):
            if store.chord_take_over(group_id, seen, token, self._claim_ttl_ms):
                store.chord_done(group_id, token, self._marker_ttl_ms)
            logger.info("Chord %r: its body had been published; recorded it", group_id)
            return False
        if not store.chord_take_over(group_id, seen, token, self._claim_ttl_ms):
            return False
        logger.warning(
            "Chord %r: the worker publishing its body died; publishing it again", group_id
        )
        return True

    def _body_has_run(self, callback: Any) -> bool:
        return any(self.store.read_state(tid) is not None for tid in body_task_ids(callback))

    def repair(self, group_id: str) -> str:
        """Publish the body of a stalled chord, or fail it.

        Stalled: its header is complete, its body not marked published, and its
        claim past the deadline. The sweep calls this for each stalled chord it finds.

        Returns
        -------
        str
            ``"repaired"`` the body was published; ``"settled"`` it had been (its
            result or progress exists) and is now recorded so; ``"failed"`` a
            ``ChordError`` was stored as its result (it cannot be built); ``"skipped"``
            the chord was not stalled after all (another worker got there first).
        """
        store, token = self.store, uuid.uuid4().hex
        stall = store.chord_reclaim(group_id, token, self._claim_ttl_ms)
        if stall.verdict not in ("C", "P"):
            return "skipped"
        body_id, callback, why = self._stored_body(group_id)
        if stall.verdict == "P" and stall.seen is not None:
            if callback is not None and self._body_has_run(callback):
                if store.chord_take_over(group_id, stall.seen, token, self._claim_ttl_ms):
                    store.chord_done(group_id, token, self._marker_ttl_ms)
                    return "settled"
                return "skipped"
            if not store.chord_take_over(group_id, stall.seen, token, self._claim_ttl_ms):
                return "skipped"
        if callback is None:
            return self._fail_unbuildable(group_id, body_id, why, token)
        logger.warning("Chord %r stalled; the sweep publishes its body", group_id)
        outcome = self._dispatch(group_id, callback, token, stall.total)
        return {"published": "repaired", "lost": "skipped"}.get(outcome, outcome)

    def _stored_body(self, group_id: str) -> tuple[str | None, Any, str]:
        """The body's id and signature as :meth:`start` kept them, or why they cannot be."""
        raw = self.store.chord_body(group_id)
        if raw is None:
            return None, None, "its body was not stored"
        try:
            kept = self.backend.decode(raw)
            body_id = kept.get("id")
            if kept.get("signature") is None:
                return body_id, None, f"its body could not be stored: {kept.get('error')}"
            return body_id, maybe_signature(kept["signature"], app=self.backend.app), ""
        except Exception as exc:
            return None, None, f"its stored body cannot be read: {exc!r}"

    def _fail_unbuildable(self, group_id: str, body_id: str | None, why: str, token: str) -> str:
        try:
            raise ChordError(f"Chord {group_id!r} stalled and {why}; its body cannot be built")
        except ChordError as error:  # fail_from_current_stack reads sys.exc_info()
            logger.exception("%s", error)
            if body_id:
                self.backend.fail_from_current_stack(body_id, exc=error)
        self.store.chord_done(group_id, token, self._marker_ttl_ms)
        return "failed"

    # -- the body's arguments ---------------------------------------------------------

    def _header_values(self, group_id: str, total: int) -> list[Any]:
        backend = self.backend
        saved = GroupResult.restore(group_id, backend=backend, app=backend.app)
        if saved is not None:
            saved.on_ready()
            with allow_join_result():
                values: list[Any] = saved.join_native(
                    timeout=self.store.settings.chord_join_timeout_s, propagate=True
                )
            return values
        return [self._unpack(item) for item in self.store.chord_values(group_id, total)]

    def _unpack(self, item: bytes) -> Any:
        _, task_id, state, value = self.backend.decode(item)
        if state in states.EXCEPTION_STATES:
            value = self.backend.exception_to_python(value)
        if state in states.PROPAGATE_STATES:
            error = ChordError(f"Dependency {task_id} raised {value!r}")
            error.__cause__ = value if isinstance(value, BaseException) else None
            raise error
        return value
