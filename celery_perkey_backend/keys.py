"""The Redis key layout and the server-side scripts, in one place.

Layout, below ``prefix`` (``global_keyprefix`` + ``perkey_key_prefix``):

================  ===========  ==========================================================
key               type         holds
================  ===========  ==========================================================
``r:{<id>}``      list         one element: the ready meta (SUCCESS, FAILURE, REVOKED),
                               behind a short header (state letter and write time)
``p:{<id>}``      stream       intermediate states (STARTED, RETRY, PROGRESS, ...), newest
                               last, and a marker entry once the task is ready
``g:{<gid>}``     string       a saved ``GroupResult``
``c:{<gid>}:j``   zset / list  a chord's header results, by header index or arrival order
``c:{<gid>}:s``   string       a chord's size
``c:{<gid>}:t``   string       members added to a running chord (``add_to_chord``)
``c:{<gid>}:d``   set          header results already counted (duplicate deliveries)
``c:{<gid>}:c``   string       the claim of the worker that publishes the body, then "done"
================  ===========  ==========================================================

Everything one script or transaction touches shares a hash tag: a task's two keys
share ``{<id>}``, a group's and its chord's keys share ``{<gid>}``. Ids that contain a
brace would break the tag, so they are tagged by a digest instead and kept in full after
it. That keeps every multi-key operation within one Redis Cluster slot.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = [
    "CHORD_DONE",
    "CHORD_PART",
    "READY_LETTERS",
    "STORE",
    "WATCH",
    "KeyLayout",
    "ReadyRecord",
    "parse_ready",
]

#: The one-letter code of each ready state, written in front of the stored meta.
#: The store script only needs to recognise ``S``: a stored SUCCESS is final.
READY_LETTERS = {"SUCCESS": "S", "FAILURE": "F", "REVOKED": "R"}

#: Field names of the progress stream's entries.
FIELD_META = b"m"
FIELD_READY = b"r"

#: The legacy key that Celery's built-in Redis backend writes.
LEGACY_TASK_PREFIX = "celery-task-meta-"


def _tagged(ident: str) -> str:
    if "{" in ident or "}" in ident:
        return "{" + hashlib.sha1(ident.encode("utf-8")).hexdigest() + "}" + ident
    return "{" + ident + "}"


@dataclass(frozen=True)
class KeyLayout:
    """Builds every key name the backend uses.

    Parameters
    ----------
    prefix:
        Prepended to every key of ours, e.g. ``"celery-perkey:"``.
    legacy_prefix:
        The prefix under which Celery's built-in backend wrote results, including any
        ``global_keyprefix``; read only, to serve results in flight during a switch.
    """

    prefix: str
    legacy_prefix: str = LEGACY_TASK_PREFIX

    def result(self, task_id: str) -> str:
        return f"{self.prefix}r:{_tagged(task_id)}"

    def progress(self, task_id: str) -> str:
        return f"{self.prefix}p:{_tagged(task_id)}"

    def legacy(self, task_id: str) -> str:
        return f"{self.legacy_prefix}{task_id}"

    def group(self, group_id: str) -> str:
        return f"{self.prefix}g:{_tagged(group_id)}"

    def chord(self, group_id: str, part: str) -> str:
        return f"{self.prefix}c:{_tagged(group_id)}:{part}"

    def chord_keys(self, group_id: str) -> list[str]:
        """The chord keys in the order the chord scripts expect: j, s, d, c, t."""
        return [self.chord(group_id, part) for part in ("j", "s", "d", "c", "t")]


@dataclass(frozen=True)
class ReadyRecord:
    """A ready result as it is stored: the state letter, the write time, the meta."""

    letter: str
    written_ms: int
    payload: bytes


def parse_ready(element: bytes) -> ReadyRecord:
    """Split a stored ready element into its header and the encoded meta.

    Raises
    ------
    ValueError
        If the element does not carry the header the store script writes.
    """
    head, sep, payload = element.partition(b"|")
    if not sep or len(head) < 2 or not head[1:].isdigit():
        raise ValueError("the stored element lacks the perkey header")
    return ReadyRecord(head[:1].decode("ascii"), int(head[1:]), payload)


# Writes one state of one task, atomically, in one round trip.
#
# KEYS: result list, progress stream.
# ARGV: ready letter ("" for an intermediate state), encoded meta, TTL in ms (0: none),
#       progress history length.
#
# A stored SUCCESS is final, as in Celery's own backends. A ready state replaces the
# list's one element and gets its TTL before the script returns, so a waiter never
# sees it without one: blocked clients are served only after the script ends. An
# intermediate state goes to the stream, so list waiters never wake for it; a newer
# intermediate state also clears an earlier non-SUCCESS ready one (a retried task).
# Once ready, the stream (if any) gets a marker entry that wakes its readers.
STORE = """
local rkey, pkey = KEYS[1], KEYS[2]
local letter, payload = ARGV[1], ARGV[2]
local ttl, history = tonumber(ARGV[3]), ARGV[4]
local current = redis.call('LINDEX', rkey, 0)
if current and string.sub(current, 1, 1) == 'S' then
  return 0
end
if current then
  redis.call('DEL', rkey)
end
if letter ~= '' then
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('RPUSH', rkey, letter .. string.format('%d', ms) .. '|' .. payload)
  if ttl > 0 then
    redis.call('PEXPIRE', rkey, ttl)
  end
  if redis.call('EXISTS', pkey) == 1 then
    redis.call('XADD', pkey, 'MAXLEN', history, '*', 'r', letter)
    if ttl > 0 then
      redis.call('PEXPIRE', pkey, ttl)
    end
  end
else
  redis.call('XADD', pkey, 'MAXLEN', history, '*', 'm', payload)
  if ttl > 0 then
    redis.call('PEXPIRE', pkey, ttl)
  end
end
return 1
"""

# One step of an ``on_message`` wait: the ready element if there is one, otherwise the
# progress entries after ``last_id``. It makes sure the progress stream exists (empty,
# with the result TTL) so that the ready write adds its marker there, which is what
# wakes the XREAD that follows.
#
# KEYS: result list, progress stream.
# ARGV: last seen stream id, TTL in ms (0: none), "1" to consume the ready element.
WATCH = """
local rkey, pkey = KEYS[1], KEYS[2]
local last, ttl, consume = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local ready
if consume == '1' then
  ready = redis.call('RPOP', rkey)
else
  ready = redis.call('LINDEX', rkey, 0)
end
if ready then
  return {ready, {}}
end
if redis.call('EXISTS', pkey) == 0 then
  redis.call('XADD', pkey, 'MAXLEN', '0', '*', 'w', '')
  if ttl > 0 then
    redis.call('PEXPIRE', pkey, ttl)
  end
end
return {false, redis.call('XRANGE', pkey, '(' .. last, '+')}
"""

# Records one header result of a chord, once per task and header index, and claims
# the right to publish the body when the last one arrives.
#
# KEYS: j (results), s (size), d (counted), c (claim), t (added), g (saved group).
# ARGV: task id, encoded result, "1" if ordered, header index, chord TTL (s),
#       group TTL (s), claim TTL (s), claim token.
# Returns {results so far, expected total or -1, 1 if this call claimed the body}.
CHORD_PART = """
local jkey, skey, dkey, ckey, tkey, gkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local tid, value, ordered, index = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl, gttl, claim_ttl, token = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]
if redis.call('GET', ckey) == 'done' then
  return {-1, -1, 0}
end
if redis.call('SADD', dkey, tid .. ':' .. index) == 1 then
  if ordered == '1' then
    redis.call('ZADD', jkey, index, value)
  else
    redis.call('RPUSH', jkey, value)
  end
end
local count
if ordered == '1' then
  count = redis.call('ZCARD', jkey)
else
  count = redis.call('LLEN', jkey)
end
if ttl > 0 then
  for _, key in ipairs({jkey, skey, dkey, tkey}) do
    redis.call('EXPIRE', key, ttl)
  end
end
if gttl > 0 then
  redis.call('EXPIRE', gkey, gttl)
end
local size = redis.call('GET', skey)
if not size then
  return {count, -1, 0}
end
local total = tonumber(size) + tonumber(redis.call('GET', tkey) or '0')
local claimed = 0
if count >= total and redis.call('SET', ckey, token, 'NX', 'EX', claim_ttl) then
  claimed = 1
end
return {count, total, claimed}
"""

# Drops a finished chord's data if the caller still holds the claim, and leaves a
# "done" marker so that a late duplicate of a header task cannot start it again.
#
# KEYS: j, s, d, c, t.  ARGV: claim token, marker TTL (s).
CHORD_DONE = """
if redis.call('GET', KEYS[4]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[5])
redis.call('SET', KEYS[4], 'done', 'EX', ARGV[2])
return 1
"""
