-- Shared by the chord scripts: the server clock, a chord's count, and its claim.
--
-- A chord's claim key says who publishes the body and by when, as
-- "<state>|<token>|<deadline ms>", then "done" once the body is published:
--   O  the header is complete and nobody has claimed the body yet: a header task
--      that reports its result claims it once no part counted in flight is left
--   C  a worker (token) is building the body's arguments
--   P  that worker is publishing the body: it may be in the broker already
-- Past its deadline a claim may be taken over: O and C at once (the body was never
-- sent; parts still in flight are settled from what their tasks stored), P only after
-- the caller found no trace of the body having run.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The state, token and deadline of a claim value; nil for none or "done".
local function parse_claim(value)
  if not value then return nil end
  local state, token, deadline = string.match(value, '^([OCP])|([^|]*)|(%d+)$')
  if not state then return nil end
  return state, token, tonumber(deadline)
end

local function claim_value(state, token, deadline)
  return state .. '|' .. token .. '|' .. string.format('%d', deadline)
end

-- Header results reported so far, those counted in flight (before their store, see
-- chord_part), and the total expected (nil while the size is unset).
local function tally(results, size, added, ordered, flight)
  local reported
  if ordered == '1' then
    reported = redis.call('ZCARD', results)
  else
    reported = redis.call('LLEN', results)
  end
  local pending = tonumber(redis.call('HGET', flight, '#') or '0')
  local expected = redis.call('GET', size)
  if not expected then return reported, pending, nil end
  return reported, pending, tonumber(expected) + tonumber(redis.call('GET', added) or '0')
end

-- SET with the chord's TTL (0: none) for a new claim key, keeping it for an old one.
local function set_claim(key, value, ttl)
  if redis.call('EXISTS', key) == 1 then
    redis.call('SET', key, value, 'KEEPTTL')
  elseif tonumber(ttl) > 0 then
    redis.call('SET', key, value, 'PX', ttl)
  else
    redis.call('SET', key, value)
  end
end
