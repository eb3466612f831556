-- GCRA rate limit (core/infra/ratelimit.py `_gcra` is this, line for line, but for the
-- bound on a TAT from a clock that stepped back).
-- KEYS[1] = key; ARGV = interval (us), limit, cost, now (us, or "" for the
-- server's clock). Numbers stay below 2^53, where Lua's doubles are exact;
-- "%.0f" stores them whole.
local interval, limit, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = tonumber(ARGV[4])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
-- No TAT stored here is more than the whole allowance ahead of its clock: one that is was
-- stored before the server's clock stepped back (NTP), and would refuse its key for as long
-- as the step (an hour back refused every client of the last minute for an hour). It
-- counts as the allowance spent, no more, and is stored so.
if tat > now + interval * limit then
  tat = now + interval * limit
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil(interval * limit / 1000))
end
local new_tat = tat + cost * interval
local over = new_tat - now - interval * limit
if over > 0 then return {0, 0, over} end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return {1, math.floor((interval * limit - (new_tat - now)) / interval), 0}
