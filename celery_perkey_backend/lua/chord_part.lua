-- Records one header result of a chord, once per task and header index, and claims
-- the right to publish the body when the last one arrives.
--
-- KEYS: results, size, counted, claim, added, group
-- ARGV: task_id, value, ordered, index, ttl_ms, group_ttl_ms, claim_ttl_ms, token
--
-- results       the header results: a zset by index (ordered) or a list
-- size          the chord's size, set as the header's last task is sent
-- counted       task:index pairs already counted, so duplicates count once
-- claim         the claim of the worker that publishes the body
-- added         members added to the running chord
-- group         the chord's saved GroupResult, whose TTL follows the chord's
-- task_id       the header task that returned
-- value         its encoded result
-- ordered       "1" to keep results in header order
-- index         its index in the header ("+inf" when Celery gives none)
-- ttl_ms        the TTL of the chord's keys, 0 for none
-- group_ttl_ms  the TTL of the saved group, 0 for none
-- claim_ttl_ms  how long a claim lives
-- token         this caller's claim token
--
-- Returns {results so far, expected total or -1, 1 if this call claimed the body};
-- {-1, -1, 0} once the chord is done. A retry with the same token (its reply was
-- lost) finds its own claim and claims again.
local results, size, counted, claim = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local added, group = KEYS[5], KEYS[6]
local tid, value, ordered, index = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl, gttl, claim_ttl, token = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]
if redis.call('GET', claim) == 'done' then
  return {-1, -1, 0}
end
if redis.call('SADD', counted, tid .. ':' .. index) == 1 then
  if ordered == '1' then
    redis.call('ZADD', results, index, value)
  else
    redis.call('RPUSH', results, value)
  end
end
local count
if ordered == '1' then
  count = redis.call('ZCARD', results)
else
  count = redis.call('LLEN', results)
end
if ttl > 0 then
  for _, key in ipairs({results, size, counted, added}) do
    redis.call('PEXPIRE', key, ttl)
  end
end
if gttl > 0 then
  redis.call('PEXPIRE', group, gttl)
end
local expected = redis.call('GET', size)
if not expected then
  return {count, -1, 0}
end
local total = tonumber(expected) + tonumber(redis.call('GET', added) or '0')
local claimed = 0
if redis.call('GET', claim) == token then
  claimed = 1
elseif count >= total and redis.call('SET', claim, token, 'NX', 'PX', claim_ttl) then
  claimed = 1
end
return {count, total, claimed}
