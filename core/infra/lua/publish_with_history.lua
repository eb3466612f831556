-- Append to a channel's history and publish, atomically.
-- KEYS: stream, meta. ARGV: Redis channel, data, size, ttl seconds, a fresh
-- epoch (used when the history is gone or not to be trusted). Backends in
-- other languages may run it (EVALSHA) to publish with history; docs/protocol.md
-- gives the recipe. A Redis Cluster runs its sharded-publish variant
-- (core/infra/broker/cluster.py).
--
-- The meta keeps the replication id of the Redis that wrote it ('r'). Another
-- id means this data went through a failover (a promoted replica) or a restart
-- from a snapshot, either of which may have lost the last publications after
-- they were delivered and acknowledged: the channel then starts a new epoch, so
-- that clients are told (recovered: false) instead of their offsets being reused.
-- Such an epoch starts with '~', so that a gateway that sees its first
-- publication knows something may have been lost before it (an epoch begun
-- because the history expired does not).
local rid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or ''
local meta = redis.call('HMGET', KEYS[2], 'e', 'r')
local epoch = meta[1]
if not epoch or (meta[2] and meta[2] ~= rid) then
    epoch = (epoch and '~' or '') .. ARGV[5]
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[2], 'e', epoch, 'o', 0, 'r', rid)
elseif not meta[2] then
    redis.call('HSET', KEYS[2], 'r', rid) -- kept by an older release: adopt it
end
local offset = redis.call('HINCRBY', KEYS[2], 'o', 1)
local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', ARGV[3], offset .. '-1', 'd', ARGV[2])
if type(added) == 'table' and added.err then
    -- Something else wrote the key: an entry with an id of its own (XADD *) is
    -- past this offset, or the key is not a stream. What it holds cannot be told
    -- from this channel's publications, so the history starts again, untrusted.
    epoch = '~' .. ARGV[5]
    offset = 1
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[2], 'e', epoch, 'o', offset, 'r', rid)
    redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], '1-1', 'd', ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[1], '\30' .. offset .. ' ' .. epoch .. ' ' .. ARGV[2])
return {offset, epoch}
