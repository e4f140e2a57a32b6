-- Takes over a chord's claim, if it is still the one the caller saw.
--
-- USES: chord_lib
-- KEYS: claim
-- ARGV: seen, token, claim_ttl_ms
--
-- seen          the claim value the caller judged
-- token         the caller's claim token
-- claim_ttl_ms  the new deadline, from now
--
-- Returns 1 (also for a retry whose reply was lost), or 0 when the claim changed
-- meanwhile.
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then
  local state, holder = parse_claim(current)
  if state == 'C' and holder == ARGV[2] then return 1 end
  return 0
end
set_claim(KEYS[1], claim_value('C', ARGV[2], now_ms() + tonumber(ARGV[3])), 0)
return 1
