-- Records one header result of a chord, once per task and header index, and, when it
-- is the call that may, claims the right to publish the body.
--
-- USES: chord_lib
-- KEYS: results, size, counted, claim, added, group
-- ARGV: task_id, value, ordered, index, ttl_ms, group_ttl_ms, claim_ttl_ms, take, token
--
-- results       the header results: a zset by index (ordered) or a list
-- size          the chord's size, set as the header's last task is sent
-- counted       task:index pairs already counted, so duplicates count once
-- claim         who publishes the body, and by when (see chord_lib)
-- added         members added to the running chord
-- group         the chord's saved GroupResult, whose TTL follows the chord's
-- task_id       the header task that returned
-- value         its encoded result
-- ordered       "1" to keep results in header order
-- index         its index in the header ("+inf" when Celery gives none)
-- ttl_ms        the TTL of the chord's keys, 0 for none
-- group_ttl_ms  the TTL of the saved group, 0 for none
-- claim_ttl_ms  how long a claim holds before it may be taken over
-- take          "1" to claim the body if the header is complete; "0" only records
--               (the result is counted before it is stored, so a task whose worker dies
--               after storing it, which Celery then acknowledges, is always counted)
-- token         this caller's claim token
--
-- Returns {results so far, expected total or -1, status, claim seen}. Status: 1 this
-- call holds the claim (a fresh one, one taken over from a claimer that never sent the
-- body, or its own: a retry whose reply was lost); 2 a publishing claim is past its
-- deadline (the claim seen is returned, for the caller to look for the body before it
-- takes it over); 0 nothing to do. {-1, -1, -1, ""} once the chord is done.
local results, size, counted, claim = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local added, group = KEYS[5], KEYS[6]
local tid, value, ordered, index = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl, gttl, claim_ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local take, token = ARGV[8] == '1', ARGV[9]
local seen = redis.call('GET', claim)
if seen == 'done' then
  return {-1, -1, -1, ''}
end
if redis.call('SADD', counted, tid .. ':' .. index) == 1 then
  if ordered == '1' then
    redis.call('ZADD', results, index, value)
  else
    redis.call('RPUSH', results, value)
  end
end
if ttl > 0 then
  for _, key in ipairs({results, size, counted, added}) do
    redis.call('PEXPIRE', key, ttl)
  end
end
if gttl > 0 then
  redis.call('PEXPIRE', group, gttl)
end
local count, total = tally(results, size, added, ordered)
if not total then
  return {count, -1, 0, ''}
end
if count < total then
  return {count, total, 0, ''}
end
local now = now_ms()
local state, holder, deadline = parse_claim(seen)
if not take then
  if not seen then
    set_claim(claim, claim_value('O', '', now + claim_ttl), ttl)
  end
  return {count, total, 0, ''}
end
if state == 'C' and holder == token then
  return {count, total, 1, ''}
end
if not seen or state == 'O' or (state == 'C' and now >= deadline) then
  set_claim(claim, claim_value('C', token, now + claim_ttl), ttl)
  return {count, total, 1, ''}
end
if state == 'P' and now >= deadline then
  return {count, total, 2, seen}
end
return {count, total, 0, ''}
