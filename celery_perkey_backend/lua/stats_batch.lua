-- Figures for stats() over a batch of keys, added up on the server so the reply stays
-- small.
--
-- USES: sweep_lib
-- KEYS: keys...
-- ARGV: count, kinds, bounds...
--
-- keys    the batch's keys
-- count   how many keys there are
-- kinds   one kind code per key (KeyLayout.kind_of), "-" for keys to skip
-- bounds  the TTL bucket bounds in ms, ascending
--
-- Returns {"code=count" pairs of the kinds seen, bucket counts (one past the last
-- bound), TTL-less keys, oldest TTL-less write in ms or -1, the positions (1-based) of
-- the keys of an unexpected type}. A key of an unexpected type is in no other figure but
-- its kind's count: the sweep never touches it, so it is not among the TTL-less keys.
local count, kinds = tonumber(ARGV[1]), ARGV[2]
local bounds = {}
for i = 3, #ARGV do bounds[#bounds + 1] = tonumber(ARGV[i]) end
local seen, buckets = {}, {}
for b = 1, #bounds + 1 do buckets[b] = 0 end
local no_ttl, oldest, unexpected = 0, -1, {}
for n = 1, count do
  local key = KEYS[n]
  local code = string.sub(kinds, n, n)
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'none' and code ~= '-' then
    seen[code] = (seen[code] or 0) + 1
    local pttl = -2
    if expected[code] and expected[code][kind] then
      pttl = redis.call('PTTL', key)
    else
      unexpected[#unexpected + 1] = n
    end
    if pttl == -1 then
      no_ttl = no_ttl + 1
      local written = stamp(key, kind, code)
      if written >= 0 and (oldest < 0 or written < oldest) then oldest = written end
    elseif pttl >= 0 then
      local b = 1
      while b <= #bounds and pttl >= bounds[b] do b = b + 1 end
      buckets[b] = buckets[b] + 1
    end
  end
end
local flat = {}
for code, n in pairs(seen) do flat[#flat + 1] = code .. '=' .. n end
return {flat, buckets, no_ttl, oldest, unexpected}
