-- Takes a ready result in read-once mode: the one way a result is consumed.
--
-- KEYS: result, state
--
-- result  the task's result list
-- state   the task's latest intermediate state
--
-- Returns the ready element, or false when there is none (nothing is changed then).
--
-- The element and any intermediate state go together, atomically, so a consumed task
-- leaves no key behind, and of several readers exactly one gets the element.
local ready = redis.call('RPOP', KEYS[1])
if ready then
  redis.call('UNLINK', KEYS[2])
end
return ready
