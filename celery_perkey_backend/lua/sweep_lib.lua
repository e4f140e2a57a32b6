-- Shared by sweep_batch.lua and stats_batch.lua: when a key was last written, and the
-- types each kind of key may have. Kind codes come from the caller (KeyLayout.kind_of),
-- so no script parses key names.

-- When a key was last written, in server ms, or -1 when the key does not say: a
-- result's header, a progress stream's newest entry id.
local function stamp(key, kind)
  if kind == 'list' then
    local v = redis.call('LINDEX', key, 0)
    if v then
      local ms = string.match(v, '^%a(%d+)|')
      if ms then return tonumber(ms) end
    end
  elseif kind == 'stream' then
    local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
    local id
    if last then
      id = last[1]
    else
      local info = redis.call('XINFO', 'STREAM', key)
      for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then id = info[i + 1] end
      end
    end
    if id then return tonumber(string.match(id, '^(%d+)')) end
  end
  return -1
end

-- The Redis types each kind of key of ours may have.
local expected = {
  r = {list = true}, p = {stream = true}, g = {string = true},
  j = {zset = true, list = true}, s = {string = true}, c = {string = true},
  t = {string = true}, d = {set = true}, b = {string = true},
}
