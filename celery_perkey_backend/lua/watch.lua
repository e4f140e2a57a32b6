-- One step of an on_message wait: the ready element if there is one, otherwise the
-- progress entries after the last one seen.
--
-- KEYS: result, progress
-- ARGV: last_id, ttl_ms
--
-- result    the task's result list
-- progress  the task's progress stream
-- last_id   the id of the last progress entry the waiter has seen ("0-0" at first)
-- ttl_ms    the TTL of a stream this step creates, 0 for none
--
-- Returns {ready element or false, progress entries after last_id}.
--
-- It makes sure the progress stream exists (empty, with the result TTL) so that the
-- ready write adds its marker there, which is what wakes the XREAD that follows. It
-- never consumes: a read-once waiter takes the result with take.lua.
local rkey, pkey = KEYS[1], KEYS[2]
local last, ttl = ARGV[1], tonumber(ARGV[2])
local ready = redis.call('LINDEX', rkey, 0)
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
