-- The nodes whose mark of life expired (docs/events.md). KEYS: the nodes zset.
-- ARGV: the most to return.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
