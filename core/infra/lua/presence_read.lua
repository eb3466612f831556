-- Presence of a channel: KEYS hash (client -> info) and zset (client ->
-- expiry, Redis server time in ms). Reading drops expired entries first, so a
-- killed node's clients vanish by themselves. ARGV: now-override (or 0).
local now = tonumber(ARGV[1])
if now == 0 then
    local t = redis.call('TIME')
    now = t[1] * 1000 + math.floor(t[2] / 1000)
end
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
if #gone > 0 then
    redis.call('HDEL', KEYS[1], unpack(gone))
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
end
return redis.call('HGETALL', KEYS[1])
