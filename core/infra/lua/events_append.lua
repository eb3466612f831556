-- Append connection events and keep one node's record, atomically (docs/events.md).
-- KEYS: the stream, the nodes (zset: node -> when its mark of life expires, Redis
-- server time in ms), the node's live connections (hash: client -> its disconnect
-- event, reported if the node is lost).
-- ARGV: node, ttl ms, maxlen, n, then n events, m, then m (client, event) pairs of
-- connections opened, then the clients of connections closed.
-- Returns 1 when the node had no mark (its first call, or it was reported lost).
local ttl = tonumber(ARGV[2])
local i = 5
for _ = 1, tonumber(ARGV[4]) do
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'event', ARGV[i])
    i = i + 1
end
local opened = tonumber(ARGV[i])
i = i + 1
for _ = 1, opened do
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
    i = i + 2
end
for j = i, #ARGV do
    redis.call('HDEL', KEYS[3], ARGV[j])
end
-- The record outlives its node (survivors read it), but not forever.
redis.call('PEXPIRE', KEYS[3], math.max(86400000, 10 * ttl))
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
