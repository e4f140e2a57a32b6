-- Drops a finished chord's data if the caller still holds the claim, and leaves a
-- "done" marker so that a late duplicate of a header task cannot start it again.
--
-- USES: chord_lib
-- KEYS: results, size, counted, claim, added, body, flight
-- ARGV: token, marker_ttl_ms
--
-- token          the claim token of the caller
-- marker_ttl_ms  how long the "done" marker lives
--
-- Returns 1, or 0 when the caller no longer holds the claim (nothing is changed).
local _, holder = parse_claim(redis.call('GET', KEYS[4]))
if holder ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[5], KEYS[6], KEYS[7])
redis.call('SET', KEYS[4], 'done', 'PX', ARGV[2])
return 1
