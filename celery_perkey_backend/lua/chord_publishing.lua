-- Records that the claimer is about to publish a chord's body: from here on, a
-- takeover must first look for the body, which may be in the broker.
--
-- USES: chord_lib
-- KEYS: claim
-- ARGV: token, claim_ttl_ms
--
-- token         the claim token of the caller
-- claim_ttl_ms  the new deadline, from now
--
-- Returns 1 (also for a retry whose reply was lost), or 0 when the caller no longer
-- holds the claim: it must not publish.
local state, holder = parse_claim(redis.call('GET', KEYS[1]))
if holder ~= ARGV[1] or state == 'O' then
  return 0
end
set_claim(KEYS[1], claim_value('P', ARGV[1], now_ms() + tonumber(ARGV[2])), 0)
return 1
