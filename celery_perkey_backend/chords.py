"""Chords: counting a chord's header results and publishing its body, once.

Each header task that returns records its result with one script on the chord's own
keys (all in the group's hash slot); the call that completes the count claims the body,
publishes it, then marks the chord done so that a late duplicate cannot start it again.
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

from .errors import quote_id
from .store import ResultStore

__all__ = ["ChordCoordinator"]

logger = logging.getLogger("celery_perkey_backend")


def _ms(seconds: float | None) -> int:
    return int(seconds * 1000) if seconds and seconds > 0 else 0


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

    def set_size(self, group_id: str, size: int) -> None:
        self.store.chord_size(group_id, int(size), _ms(self.store.settings.chord_expires_s))

    def add(self, group_id: str) -> None:
        self.store.chord_add(group_id)

    def save_header(self, header_result_args: Any) -> None:
        """Save a header that holds groups, so it is joined with its structure intact.

        A flat header is rebuilt from the chord's own list instead.
        """
        # Celery hands a plain list, or for a generator header a lazy list subclass that
        # reading here would consume before the header is sent.
        if type(header_result_args[1]) is not list:
            return
        backend = self.backend
        header = backend.app.GroupResult(*header_result_args)
        if any(isinstance(member, GroupResult) for member in header.results):
            self.store.set(
                backend.get_key_for_group(header.id),
                backend.encode({"result": header.as_tuple()}),
                _ms(self.store.settings.chord_result_expires_s),
                what=f"save chord header {quote_id(header.id)}",
            )

    def part_returned(self, request: Any, state: str, result: Any) -> None:
        """Count one header result; the call that completes the chord runs its body."""
        task_id, group_id = request.id, request.group
        if not task_id or not group_id:
            return
        backend, settings = self.backend, self.store.settings
        index = "+inf" if request.group_index is None else request.group_index
        value = backend.encode([1, task_id, state, backend.encode_result(result, state)])
        claim_ttl_ms = max(5000, int(settings.chord_join_timeout_s * 2) * 1000)
        token = uuid.uuid4().hex
        tally = self.store.chord_part(
            group_id,
            task_id,
            value,
            index,
            _ms(settings.chord_expires_s),
            _ms(settings.chord_result_expires_s),
            claim_ttl_ms,
            token,
        )
        if not tally.claimed:
            return
        callback = maybe_signature(request.chord, app=backend.app)
        try:
            values = self._header_values(group_id, tally.total)
            callback.delay(values)
        except ChordError as exc:
            logger.exception("Chord %r raised: %r", group_id, exc)
            backend.chord_error_from_stack(callback, exc)
        except Exception as exc:
            logger.exception("Chord %r raised: %r", group_id, exc)
            error = ChordError(f"Join error: {exc!r}")
            error.__cause__ = exc
            backend.chord_error_from_stack(callback, error)
        finally:
            self.store.chord_done(group_id, token, max(claim_ttl_ms * 2, 300_000))

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
