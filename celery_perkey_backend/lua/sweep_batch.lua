-- Classifies a batch of keys and, unless it is a dry run, fixes them, in one atomic
-- call, so nothing can change a key between the verdict and the fix.
--
-- USES: sweep_lib
-- KEYS: keys...
-- ARGV: fix, delete, ttl_ms, cutoff_ms, weigh, count, kinds, sizes, lock, token, lock_ms
--
-- keys       the batch's keys, then the chord size keys they refer to (declared, so the
--            call stays within its slot on a cluster), then the sweep lock if it is checked
--            here
-- fix        "1" to act, "0" for a dry run
-- delete     "1" to unlink keys last written before the cutoff
-- ttl_ms     the TTL given to keys that have none
-- cutoff_ms  server ms: only keys last written before it count as too old
-- weigh      how many unlinked keys to weigh with MEMORY USAGE first
-- count      how many of KEYS are the batch's keys
-- kinds      one kind code per batch key (KeyLayout.kind_of), "-" for keys to skip
-- sizes      comma-separated, per batch key: the KEYS index of its chord size key, or 0
-- lock       the KEYS index of the sweep lock, or 0: the caller renews it itself (on a
--            cluster the lock lives in another slot)
-- token      the sweep's lock token: the batch runs only while it holds the lock
-- lock_ms    the lock's renewed TTL
--
-- Returns {class letters, action letters, bytes weighed, keys weighed, lock held}, one
-- letter per batch key. Classes: H healthy, N no TTL, O too old, L leftover of a finished
-- chord, U unexpected type, "-" gone or skipped. Actions: "." none, "t" TTL set, "u"
-- unlinked. A key written after the cutoff is never unlinked. A lock that another holds
-- now (ours expired, or was taken) stops the batch before it looks at any key: it
-- returns {"", "", 0, 0, 0}.
local lock = tonumber(ARGV[9])
if lock > 0 then
  if redis.call('GET', KEYS[lock]) ~= ARGV[10] then return {'', '', 0, 0, 0} end
  redis.call('PEXPIRE', KEYS[lock], ARGV[11])
end
local fix, delete = ARGV[1] == '1', ARGV[2] == '1'
local ttl, cutoff, weigh = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local count, kinds = tonumber(ARGV[6]), ARGV[7]
local sizes = {}
for index in string.gmatch(ARGV[8], '[^,]+') do sizes[#sizes + 1] = tonumber(index) end
local classes, actions = {}, {}
local bytes, weighed = 0, 0
for n = 1, count do
  local key = KEYS[n]
  local code = string.sub(kinds, n, n)
  local kind, written = look(key, code)
  local class, action = '-', '.'
  if kind ~= 'none' and code ~= '-' then
    local no_ttl = redis.call('PTTL', key) == -1
    if not (expected[code] and expected[code][kind]) then
      class = 'U'
    elseif sizes[n] > 0 and redis.call('EXISTS', KEYS[sizes[n]]) == 0 then
      class = 'L'
      if no_ttl then action = 't' end
    else
      if written == nil then written = stamp(key, kind, code) end
      if written >= 0 and written < cutoff then
        class = 'O'
        if delete then action = 'u' elseif no_ttl then action = 't' end
      elseif no_ttl then
        class, action = 'N', 't'
      else
        class = 'H'
      end
    end
    if fix and action == 't' then
      redis.call('PEXPIRE', key, ttl)
    elseif fix and action == 'u' then
      if weighed < weigh then
        bytes = bytes + (redis.call('MEMORY', 'USAGE', key) or 0)
        weighed = weighed + 1
      end
      redis.call('UNLINK', key)
    end
  end
  classes[n], actions[n] = class, action
end
return {table.concat(classes), table.concat(actions), bytes, weighed, 1}
