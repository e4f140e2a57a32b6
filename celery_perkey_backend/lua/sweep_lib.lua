-- Shared by sweep_batch.lua and stats_batch.lua: when a key was last written, and the
-- types each kind of key may have. Kind codes come from the caller (KeyLayout.kind_of),
-- so no script parses key names.

-- When a key was last written, in server ms, or -1 when the key does not say: the
-- header of a result, of a take's copy of one or of an intermediate state, a progress
-- stream's newest entry id (streams are what versions before 0.2 kept intermediate
-- states in).
local function stamp(key, kind, code)
  local v
  if kind == 'list' and code == 'r' then
    v = redis.call('LINDEX', key, 0)
  elseif kind == 'string' and (code == 's' or code == 'k') then
    v = redis.call('GET', key)
  end
  if v then
    local ms = string.match(v, '^%a(%d+)|')
    if ms then return tonumber(ms) end
  end
  if kind == 'stream' then
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

-- A key's type and, for a result (kind code r), when it was written: one LINDEX, which
-- also tells a result list from a missing key (nil) or a key of another type (WRONGTYPE),
-- where TYPE and then LINDEX would take two calls. The write time is nil when not read.
local function look(key, code)
  if code == 'r' then
    local v = redis.pcall('LINDEX', key, 0)
    if not v then return 'none', nil end
    if type(v) == 'string' then
      local ms = string.match(v, '^%a(%d+)|')
      return 'list', ms and tonumber(ms) or -1
    end
  end
  return redis.call('TYPE', key)['ok'], nil
end

-- The Redis types each kind of key of ours may have.
local expected = {
  r = {list = true}, s = {string = true}, p = {stream = true}, w = {set = true},
  i = {list = true}, k = {string = true}, g = {string = true}, j = {zset = true, list = true},
  n = {string = true}, c = {string = true}, t = {string = true}, d = {set = true},
  b = {string = true}, f = {hash = true},
}
