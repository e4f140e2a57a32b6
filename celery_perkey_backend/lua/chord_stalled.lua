-- Judges whether a chord has stalled: its header is complete, its body not marked
-- published, and its claim past its deadline; and, if asked to, claims it.
--
-- USES: chord_lib
-- KEYS: results, size, claim, added, flight
-- ARGV: ordered, take, token, claim_ttl_ms
--
-- flight        the header results counted in flight (see chord_part): they count
--               here, as their tasks may have died after storing them
-- ordered       "1" when results are a zset by index
-- take          "1" to claim a stalled chord, "0" only to judge
-- token         the caller's claim token
-- claim_ttl_ms  how long the caller's claim holds
--
-- Returns {verdict, total, claim seen}. Verdicts: "-" not stalled (incomplete, claimed
-- in time, done, or gone); "S" stalled (when only judging); "C" claimed now by the
-- caller (its claimer never sent the body); "P" stalled while publishing: the claim
-- seen is returned, for the caller to look for the body before it takes it over.
local results, size, claim, added, flight = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local seen = redis.call('GET', claim)
local state, _, deadline = parse_claim(seen)
if not state then
  return {'-', 0, ''}
end
local reported, in_flight, total = tally(results, size, added, ARGV[1], flight)
if not total or reported + in_flight < total then
  return {'-', total or 0, ''}
end
local now = now_ms()
if now < deadline then
  return {'-', total, ''}
end
if ARGV[2] ~= '1' then
  return {'S', total, ''}
end
if state == 'P' then
  return {'P', total, seen}
end
set_claim(claim, claim_value('C', ARGV[3], now + tonumber(ARGV[4])), 0)
return {'C', total, ''}
