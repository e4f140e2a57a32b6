-- Takes a ready result in read-once mode: the one way a result is consumed.
--
-- KEYS: result, state, taken
-- ARGV: taken_ttl_ms
--
-- result        the task's result list
-- state         the task's latest intermediate state
-- taken         this take's copy of what it takes (KeyLayout.taken: the task and the
--               take's token, the same for every retry of one take)
-- taken_ttl_ms  how long the copy lives, unless the taker deletes it on receipt
--
-- Returns the ready element, or false when there is none (nothing is changed then).
--
-- The element and any intermediate state go together, atomically, so a consumed task
-- leaves no key behind, and of several readers exactly one gets the element. The
-- element is also kept in the taken key: a retry of the same take, after its reply was
-- lost on the way, finds it there and gets it again; a take with another token never
-- sees it.
local kept = redis.call('GET', KEYS[3])
if kept then
  redis.call('PEXPIRE', KEYS[3], ARGV[1])
  return kept
end
local ready = redis.call('RPOP', KEYS[1])
if ready then
  redis.call('UNLINK', KEYS[2])
  redis.call('SET', KEYS[3], ready, 'PX', ARGV[1])
end
return ready
