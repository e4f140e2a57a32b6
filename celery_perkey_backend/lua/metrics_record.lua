-- Adds to the counters of the metrics hash and sets its other fields, atomically; the
-- key metrics only if they were measured no earlier than the ones it holds.
--
-- KEYS: metrics
-- ARGV: stats_ms, stats, changes...
--
-- stats_ms  server ms at which the key metrics were measured, or 0 for none
-- stats     the key metrics (JSON), or ""
-- changes   triples: "+" field n (HINCRBY) or "=" field value (HSET)
--
-- Returns the names of the fields it found holding no number where it needed one (a
-- counter, or stats_ms): each was set anew (the counter to n, as if it had been 0).
-- Nothing read back from the hash can make the script fail.
local repaired = {}
local stats_ms = tonumber(ARGV[1])
if stats_ms > 0 then
  local raw = redis.call('HGET', KEYS[1], 'stats_ms')
  local held = tonumber(raw or '0')
  if not held then
    repaired[#repaired + 1] = 'stats_ms'
    held = 0
  end
  if stats_ms >= held then
    redis.call('HSET', KEYS[1], 'stats', ARGV[2], 'stats_ms', ARGV[1])
  end
end
for i = 3, #ARGV, 3 do
  if ARGV[i] == '+' then
    local added = redis.pcall('HINCRBY', KEYS[1], ARGV[i + 1], ARGV[i + 2])
    if type(added) ~= 'number' then
      repaired[#repaired + 1] = ARGV[i + 1]
      redis.call('HSET', KEYS[1], ARGV[i + 1], ARGV[i + 2])
    end
  else
    redis.call('HSET', KEYS[1], ARGV[i + 1], ARGV[i + 2])
  end
end
return repaired
