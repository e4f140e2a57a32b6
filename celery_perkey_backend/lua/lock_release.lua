-- Releases a lock, only for its owner.
--
-- KEYS: lock
-- ARGV: token
--
-- Returns 1 if released, 0 if another owner holds it (or nobody).
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
