-- Give back what an allowed GCRA hit counted.
-- KEYS[1] = key; ARGV = interval (us), cost, now (us, or ""): the TAT moves
-- back, never past now.
local interval, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then return 0 end
tat = tat - cost * interval
if tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
end
return 1
