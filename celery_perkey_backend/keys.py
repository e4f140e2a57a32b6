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
    "ACL_COMMANDS",
    "CHORD_DONE",
    "CHORD_PART",
    "CHORD_SIZE",
    "READY_LETTERS",
    "STORE",
    "TAKE",
    "WATCH",
    "KeyLayout",
    "ReadyRecord",
    "acl_rules",
    "glob_escape",
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

    @property
    def sweep_lock(self) -> str:
        return self.prefix + SWEEP_LOCK

    @property
    def match_all(self) -> str:
        """A SCAN MATCH pattern for every key of ours and nothing else."""
        return glob_escape(self.prefix) + "*"


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
#       progress history length, the progress stream's TTL in ms once the task is ready.
#
# A stored SUCCESS is final, as in Celery's own backends. A ready state replaces the
# list's one element and gets its TTL before the script returns, so a waiter never
# sees it without one: blocked clients are served only after the script ends. An
# intermediate state goes to the stream, so list waiters never wake for it; a newer
# intermediate state also clears an earlier non-SUCCESS ready one (a retried task).
# Once ready, the stream (if any) gets a marker entry that wakes its readers, and then
# only lives a short grace: the result answers every read, and a new stream costs the
# server about 4 KB, which would otherwise stay for the whole result TTL.
STORE = """
local rkey, pkey = KEYS[1], KEYS[2]
local letter, payload = ARGV[1], ARGV[2]
local ttl, history, grace = tonumber(ARGV[3]), ARGV[4], ARGV[5]
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
    redis.call('PEXPIRE', pkey, grace)
  end
else
  redis.call('XADD', pkey, 'MAXLEN', history, '*', 'm', payload)
  if ttl > 0 then
    redis.call('PEXPIRE', pkey, ttl)
  else
    redis.call('PERSIST', pkey)
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
  if ready then
    redis.call('UNLINK', pkey)
  end
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

# Takes a ready result in read-once mode, and its progress history with it, so a
# consumed task leaves no key behind. KEYS: result list, progress stream.
TAKE = """
local ready = redis.call('RPOP', KEYS[1])
if ready then
  redis.call('UNLINK', KEYS[2])
end
return ready
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

# Sets a chord's size for a new run. Reapplying a frozen chord reuses its group id,
# so the old run's claim goes; results stay: Celery sets the size only as it sends
# the header's last task, and earlier parts may have returned already.
# KEYS: s, c.  ARGV: size, TTL in ms (0: none).
CHORD_SIZE = """
redis.call('DEL', KEYS[2])
if tonumber(ARGV[2]) > 0 then
  return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1])
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


# -- the sweep ------------------------------------------------------------------------

#: The sweep lock, under our prefix; the sweep skips it.
SWEEP_LOCK = "lock:sweep"

#: What the kind codes of the sweep scripts (``kind_of`` below) stand for.
KIND_NAMES = {
    "r": "result",
    "p": "progress",
    "g": "group",
    "j": "chord",
    "s": "chord",
    "d": "chord",
    "c": "chord",
    "t": "chord",
    "x": "unknown",
}

#: Class letters the sweep script answers with, one per key.
CLASS_LETTERS = {
    "H": "healthy",
    "N": "no_ttl",
    "O": "too_old",
    "L": "leftover",
    "U": "unexpected",
}

# Lua shared by the sweep scripts: when a key was last written (server ms, or -1 when
# the key does not say: a result's header, a progress stream's newest entry id), and
# the types each kind of key may have.
_SWEEP_LIB = """
local function stamp(key, kind)
  if kind == 'list' then
    local v = redis.call('LINDEX', key, 0)
    if v then
      local ms = string.match(v, '^%a(%d+)|')
      if ms then return tonumber(ms) end
    end
  elseif kind == 'stream' then
    local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
    local id
    if last then
      id = last[1]
    else
      local info = redis.call('XINFO', 'STREAM', key)
      for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then id = info[i + 1] end
      end
    end
    if id then return tonumber(string.match(id, '^(%d+)')) end
  end
  return -1
end
local expected = {
  r = {list = true}, p = {stream = true}, g = {string = true},
  j = {zset = true, list = true}, s = {string = true}, c = {string = true},
  t = {string = true}, d = {set = true},
}
local chord_data = {j = true, d = true, t = true}
-- The kind code of a key of ours from its name (see KeyLayout), "l" for the sweep
-- lock, "x" for anything else under the prefix.
local function kind_of(key, prefix)
  local rest = string.sub(key, #prefix + 1)
  if rest == 'lock:sweep' then return 'l' end
  local code = string.sub(rest, 1, 1)
  if string.sub(rest, 2, 3) ~= ':{' then return 'x' end
  if code == 'r' or code == 'p' or code == 'g' then return code end
  if code == 'c' then
    local part = string.match(rest, ':([jsdct])$')
    if part then return part end
  end
  return 'x'
end
-- KEYS holds the batch's keys first, then the size key of each chord part in it
-- (declared so the script stays within its slot); look those up by name.
local function declared(count)
  local extra = {}
  for i = count + 1, #KEYS do extra[KEYS[i]] = true end
  return extra
end
"""

# Classifies a batch of keys and, unless it is a dry run, fixes them, in one atomic
# call, so nothing can change a key between the verdict and the fix. A key written
# after the cutoff (the sweep's start minus max age) is never unlinked.
#
# KEYS: the batch's keys, then the size key of each chord part among them (on a
#       cluster, one call's keys share a slot).
# ARGV: "1" to fix, "1" to unlink too-old keys, TTL ms, cutoff ms, keys to weigh with
#       MEMORY USAGE before unlinking, the key prefix, the number of batch keys.
# Returns {class letters, action letters ("." none, "t" TTL, "u" unlink), bytes
# weighed, keys weighed}, one letter per batch key; a key that is gone answers "-".
SWEEP_BATCH = (
    _SWEEP_LIB
    + """
local fix, delete = ARGV[1] == '1', ARGV[2] == '1'
local ttl, cutoff, weigh = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local prefix, count = ARGV[6], tonumber(ARGV[7])
local sizes = declared(count)
local classes, actions = {}, {}
local bytes, weighed = 0, 0
for n = 1, count do
  local key = KEYS[n]
  local code = kind_of(key, prefix)
  local kind = redis.call('TYPE', key)['ok']
  local class, action = '-', '.'
  if kind ~= 'none' and code ~= 'l' then
    local no_ttl = redis.call('PTTL', key) == -1
    local size_key = string.sub(key, 1, -2) .. 's'
    if not (expected[code] and expected[code][kind]) then
      class = 'U'
    elseif chord_data[code] and sizes[size_key] and redis.call('EXISTS', size_key) == 0 then
      class = 'L'
      if no_ttl then action = 't' end
    else
      local written = stamp(key, kind)
      if written >= 0 and written < cutoff then
        class = 'O'
        if delete then action = 'u' elseif no_ttl then action = 't' end
      elseif no_ttl then
        class, action = 'N', 't'
      else
        class = 'H'
      end
    end
    if fix and action == 't' then
      redis.call('PEXPIRE', key, ttl)
    elseif fix and action == 'u' then
      if weighed < weigh then
        bytes = bytes + (redis.call('MEMORY', 'USAGE', key) or 0)
        weighed = weighed + 1
      end
      redis.call('UNLINK', key)
    end
  end
  classes[n], actions[n] = class, action
end
return {table.concat(classes), table.concat(actions), bytes, weighed}
"""
)

# Figures for ``stats()`` over a batch of keys, added up on the server so the reply
# stays small. KEYS as for SWEEP_BATCH. ARGV: the key prefix, the number of batch keys,
# then the TTL bucket bounds in ms, ascending.
# Returns {kinds seen as "code=count" pairs, bucket counts (one past the last bound),
# TTL-less keys, oldest TTL-less write ms or -1, unexpected types}.
STATS_BATCH = (
    _SWEEP_LIB
    + """
local prefix, count = ARGV[1], tonumber(ARGV[2])
local bounds = {}
for i = 3, #ARGV do bounds[#bounds + 1] = tonumber(ARGV[i]) end
local kinds, buckets = {}, {}
for b = 1, #bounds + 1 do buckets[b] = 0 end
local no_ttl, oldest, unexpected = 0, -1, 0
for n = 1, count do
  local key = KEYS[n]
  local code = kind_of(key, prefix)
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'none' and code ~= 'l' then
    kinds[code] = (kinds[code] or 0) + 1
    if not (expected[code] and expected[code][kind]) then unexpected = unexpected + 1 end
    local pttl = redis.call('PTTL', key)
    if pttl == -1 then
      no_ttl = no_ttl + 1
      local written = stamp(key, kind)
      if written >= 0 and (oldest < 0 or written < oldest) then oldest = written end
    elseif pttl >= 0 then
      local b = 1
      while b <= #bounds and pttl >= bounds[b] do b = b + 1 end
      buckets[b] = buckets[b] + 1
    end
  end
end
local flat = {}
for code, n in pairs(kinds) do flat[#flat + 1] = code .. '=' .. n end
return {flat, buckets, no_ttl, oldest, unexpected}
"""
)

# Releases or renews the sweep lock only for its owner.  KEYS: lock.  ARGV: token, ms.
LOCK_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
LOCK_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def glob_escape(text: str) -> str:
    """Escape glob metacharacters so that SCAN MATCH takes ``text`` literally."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


# -- least privilege ------------------------------------------------------------------

#: Every command the backend, its scripts, the sweep, ``stats()`` and redis-py's
#: connection handshake run. An ACL user limited to these and to our keys runs it all.
ACL_COMMANDS = (
    # connection
    "hello", "auth", "client|setinfo", "client|setname", "ping", "select",
    # results and waits
    "evalsha", "eval", "script|load", "script|exists", "lindex", "rpush", "rpop", "lrange", "llen",
    "blmove", "brpoplpush", "brpop", "xadd", "xrange", "xrevrange", "xread",
    "xinfo|stream", "get", "set", "del", "unlink", "exists", "pexpire", "expire",
    "time", "incr", "sadd", "zadd", "zcard", "zrange", "type", "pttl",
    # sweep and stats
    "scan", "dbsize", "info", "memory|usage",
)  # fmt: skip


def acl_rules(layout: KeyLayout) -> str:
    """The ``ACL SETUSER`` rules for a least-privilege backend user.

    It may touch only our keys, plus the legacy ``celery-task-meta-*`` keys that reads
    fall back to during a switch from ``redis://`` (drop that pattern when
    ``perkey_legacy_fallback`` is off).
    """
    patterns = f"~{glob_escape(layout.prefix)}* ~{glob_escape(layout.legacy_prefix)}*"
    return f"resetkeys {patterns} resetchannels -@all " + " ".join(
        f"+{command}" for command in ACL_COMMANDS
    )
