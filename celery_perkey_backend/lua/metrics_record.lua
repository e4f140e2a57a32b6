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
-- Returns 1.
local stats_ms = tonumber(ARGV[1])
if stats_ms > 0 then
  local held = tonumber(redis.call('HGET', KEYS[1], 'stats_ms') or '0')
  if stats_ms >= held then
    redis.call('HSET', KEYS[1], 'stats', ARGV[2], 'stats_ms', ARGV[1])
  end
end
for i = 3, #ARGV, 3 do
  if ARGV[i] == '+' then
    redis.call('HINCRBY', KEYS[1], ARGV[i + 1], ARGV[i + 2])
  else
    redis.call('HSET', KEYS[1], ARGV[i + 1], ARGV[i + 2])
  end
end
return 1
