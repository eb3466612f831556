-- Append to a channel's history and publish, atomically.
-- KEYS: stream, meta. ARGV: Redis channel, data, size, ttl seconds, a fresh
-- epoch (used when the history is gone). Backends in other languages may run
-- it (EVALSHA) to publish with history; docs/protocol.md gives the recipe.
-- A Redis Cluster runs its sharded-publish variant (core/infra/broker/cluster.py).
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
    epoch = ARGV[5]
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[2], 'e', epoch, 'o', 0)
end
local offset = redis.call('HINCRBY', KEYS[2], 'o', 1)
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], offset .. '-1', 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[1], '\30' .. offset .. ' ' .. epoch .. ' ' .. ARGV[2])
return {offset, epoch}
