-- Records one header result of a chord, once per task and header index, and, when it
-- is the call that may, claims the right to publish the body.
--
-- USES: chord_lib
-- KEYS: results, size, counted, claim, added, group, flight
-- ARGV: task_id, value, ordered, index, ttl_ms, group_ttl_ms, claim_ttl_ms, take, token, final
--
-- results       the header results their tasks reported: a zset by index (ordered) or
--               a list
-- size          the chord's size, set as the header's last task is sent
-- counted       task:index pairs already counted, so duplicates count once
-- claim         who publishes the body, and by when (see chord_lib)
-- added         members added to the running chord
-- group         the chord's saved GroupResult, whose TTL follows the chord's
-- flight        header results counted in flight: a hash of value by task:index, ""
--               once reported, and their number under "#" (deleted when none is left)
-- task_id       the header task
-- value         its encoded result
-- ordered       "1" to keep results in header order
-- index         its index in the header ("+inf" when Celery gives none)
-- ttl_ms        the TTL of the chord's keys, 0 for none
-- group_ttl_ms  the TTL of the saved group, 0 for none
-- claim_ttl_ms  how long a claim holds before it may be taken over
-- take          "0": the result is about to be stored. It counts at once, in flight (a
--               task whose worker dies after storing it, which Celery then
--               acknowledges, is always counted); a later call for the same part only
--               replaces the value. "1": the task reports its result (Celery's
--               on_chord_part_return, after the store); a part in flight moves to the
--               results, and the call claims the body if the header is complete
-- token         this caller's claim token
-- final         "1" when value is the part's final result (a failure reported by the
--               worker that lost the task, or what the task stored): it replaces the
--               value counted in flight, so that the body sees what the task ended as
--
-- Returns {results so far, expected total or -1, status, claim seen}. Status: 1 this
-- call holds the claim (a fresh one, one taken over from a claimer that never sent the
-- body, or its own: a retry whose reply was lost); 2 a publishing claim is past its
-- deadline (the claim seen is returned, for the caller to look for the body before it
-- takes it over); 3 the header is complete but parts counted in flight have not
-- reported (their tasks may still fail); 0 nothing to do. {-1, -1, -1, ""} once the
-- chord is done.
local results, size, counted, claim = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local added, group, flight = KEYS[5], KEYS[6], KEYS[7]
local tid, value, ordered, index = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl, gttl, claim_ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local take, token, final = ARGV[8] == '1', ARGV[9], ARGV[10] == '1'
local seen = redis.call('GET', claim)
if seen == 'done' then
  return {-1, -1, -1, ''}
end
local part = tid .. ':' .. index
local function report(v)
  if ordered == '1' then
    redis.call('ZADD', results, index, v)
  else
    redis.call('RPUSH', results, v)
  end
end
local new = redis.call('SADD', counted, part) == 1
local pending = (not new) and redis.call('HGET', flight, part) or nil
if take then
  if new then
    report(value)
  elseif pending and pending ~= '' then
    report(final and value or pending)
    redis.call('HSET', flight, part, '')
    if redis.call('HINCRBY', flight, '#', -1) <= 0 then
      redis.call('DEL', flight)
    end
  end
elseif new then
  redis.call('HSET', flight, part, value)
  redis.call('HINCRBY', flight, '#', 1)
elseif pending and pending ~= '' then
  redis.call('HSET', flight, part, value)
end
if ttl > 0 then
  for _, key in ipairs({results, size, counted, added, flight}) do
    redis.call('PEXPIRE', key, ttl)
  end
end
if gttl > 0 then
  redis.call('PEXPIRE', group, gttl)
end
local reported, in_flight, total = tally(results, size, added, ordered, flight)
local count = reported + in_flight
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
if not seen or state == 'O' then
  -- Parts in flight may yet fail; past the deadline their tasks are taken as lost,
  -- and the claimer settles them from what was stored (as the sweep does).
  if reported < total and not (state == 'O' and now >= deadline) then
    if not seen then
      set_claim(claim, claim_value('O', '', now + claim_ttl), ttl)
    end
    return {count, total, 3, ''}
  end
  set_claim(claim, claim_value('C', token, now + claim_ttl), ttl)
  return {count, total, 1, ''}
end
if state == 'C' and now >= deadline then
  set_claim(claim, claim_value('C', token, now + claim_ttl), ttl)
  return {count, total, 1, ''}
end
if state == 'P' and now >= deadline then
  return {count, total, 2, seen}
end
return {count, total, 0, ''}
