-- Writes one state of one task, atomically, in one round trip.
--
-- KEYS: result, progress
-- ARGV: letter, payload, ttl_ms, history, grace_ms
--
-- result    the task's result list: one element once the task is ready
-- progress  the task's progress stream: intermediate states
-- letter    the ready state's letter (S, F, R), or "" for an intermediate state
-- payload   the encoded meta
-- ttl_ms    the TTL of what is written, 0 for none
-- history   how many intermediate states the stream keeps
-- grace_ms  how long the stream outlives the task becoming ready
--
-- Returns 1, or 0 when a stored SUCCESS was kept.
--
-- A stored SUCCESS is final, as in Celery's own backends. A ready state replaces the
-- list's one element and gets its TTL before the script returns, so a waiter never
-- sees it without one: blocked clients are served only after the script ends. An
-- intermediate state goes to the stream, so list waiters never wake for it; a newer
-- intermediate state also clears an earlier non-SUCCESS ready one (a retried task).
-- Once ready, the stream (if any) gets a marker entry that wakes its readers, and then
-- only lives a short grace: the result answers every read, and a new stream costs the
-- server about 4 KB, which would otherwise stay for the whole result TTL.
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
