-- Writes one state of one task, atomically, in one round trip, and tells the waiters
-- that registered for it.
--
-- KEYS: result, state, watchers
-- ARGV: letter, payload, ttl_ms, task_id, push, inline_max, inbox_ttl_ms, inbox_prefix
--
-- result        the task's result list: one element once the task is ready
-- state         the task's latest intermediate state (STARTED, RETRY, PROGRESS, ...)
-- watchers      the inboxes of the processes waiting on the task (register.lua)
-- letter        the ready state's letter (S, F, R), or "" for an intermediate state
-- payload       the encoded meta
-- ttl_ms        the TTL of what is written, 0 for none
-- task_id       the task's id, named in the notifications
-- push          "1": push the notifications to the inboxes here (one server: the inbox
--               keys are not declared, which only a cluster forbids); "0": return them
-- inline_max    the largest stored element a notification carries along
-- inbox_ttl_ms  the TTL an inbox gets with each notification
-- inbox_prefix  what every inbox name of ours starts with (KeyLayout.inbox_prefix); an
--               inbox name is that, then a name without braces, then "}"
--
-- Returns {0} when a stored SUCCESS was kept; {1, skipped, repaired} when stored (and any
-- notifications pushed); {1, skipped, repaired, notification, inbox, ...} when stored
-- and the caller must push it. skipped: members of the watchers set that are no inbox
-- of ours (they are never pushed to, and are taken out of the set); repaired: inboxes
-- that held another type than a list (a key written over one), replaced by a list
-- holding the notification. Neither can fail the store, whose writes come first.
--
-- A stored SUCCESS is final, as in Celery's own backends. A ready state replaces the
-- list's one element and gets its TTL before the script returns, so a waiter never
-- sees it without one: blocked clients are served only after the script ends. Its
-- intermediate state goes. An intermediate state is one small string, so waiters that
-- block on the list never wake for it; a newer one also clears an earlier non-SUCCESS
-- ready state (a retried task). Every stored element carries a header: the state's
-- letter (P for an intermediate state) and the server's time in ms, then "|".
--
-- A notification is a kind letter, the task id's length, ":", the task id, then the
-- stored element when it is at most inline_max bytes. Kinds: R ready, P intermediate;
-- lower case when the element is left out (the waiter reads it).
local rkey, skey, wkey = KEYS[1], KEYS[2], KEYS[3]
local letter, payload, ttl, tid = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local push, inline_max, inbox_ttl = ARGV[5], tonumber(ARGV[6]), ARGV[7]
local current = redis.call('LINDEX', rkey, 0)
if current and string.sub(current, 1, 1) == 'S' then
  return {0}
end
if current then
  redis.call('DEL', rkey)
end
local now = redis.call('TIME')
local ms = string.format('%d', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
local element, kind
if letter ~= '' then
  element, kind = letter .. ms .. '|' .. payload, 'R'
  redis.call('RPUSH', rkey, element)
  if ttl > 0 then
    redis.call('PEXPIRE', rkey, ttl)
  end
  redis.call('DEL', skey)
else
  element, kind = 'P' .. ms .. '|' .. payload, 'P'
  if ttl > 0 then
    redis.call('SET', skey, element, 'PX', ttl)
  else
    redis.call('SET', skey, element)
  end
end
local members = redis.call('SMEMBERS', wkey)
if #members == 0 then
  return {1, 0, 0}
end
-- Only names of our inboxes: a member naming any other key (another task's result)
-- must never be written to.
local prefix = ARGV[8]
local inboxes, skipped = {}, 0
for _, member in ipairs(members) do
  if string.sub(member, 1, #prefix) == prefix and string.find(member, '^[^{}]+}$', #prefix + 1) then
    inboxes[#inboxes + 1] = member
  else
    skipped = skipped + 1
    redis.call('SREM', wkey, member)
  end
end
if kind == 'R' then
  redis.call('DEL', wkey)
end
if #inboxes == 0 then
  return {1, skipped, 0}
end
local note = string.len(tid) .. ':' .. tid
if string.len(element) <= inline_max then
  note = kind .. note .. element
else
  note = string.lower(kind) .. note
end
if push == '1' then
  local repaired = 0
  for _, inbox in ipairs(inboxes) do
    if type(redis.pcall('RPUSH', inbox, note)) ~= 'number' then
      -- Not a list: a key written over the inbox. It is ours: make it one again.
      redis.call('DEL', inbox)
      redis.call('RPUSH', inbox, note)
      repaired = repaired + 1
    end
    redis.call('PEXPIRE', inbox, inbox_ttl)
  end
  return {1, skipped, repaired}
end
local reply = {1, skipped, 0, note}
for _, inbox in ipairs(inboxes) do reply[#reply + 1] = inbox end
return reply
