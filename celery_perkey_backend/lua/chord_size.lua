-- Sets a chord's size for a new run.
--
-- KEYS: size, claim
-- ARGV: count, ttl_ms
--
-- size    the chord's size key
-- claim   the chord's claim key
-- count   the number of header tasks
-- ttl_ms  the size key's TTL, 0 for none
--
-- Reapplying a frozen chord reuses its group id, so the old run's claim goes; results
-- stay: Celery sets the size only as it sends the header's last task, and earlier
-- parts may have returned already.
redis.call('DEL', KEYS[2])
if tonumber(ARGV[2]) > 0 then
  return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1])
