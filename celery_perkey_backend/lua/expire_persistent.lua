-- Gives a key a TTL if it has none, and leaves any TTL it has alone (EXPIRE NX,
-- which Redis 6.2 lacks).
--
-- KEYS: key
-- ARGV: ttl_ms
--
-- Returns 1 if the key got the TTL, 0 if it had one or is gone.
if redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  return 1
end
return 0
