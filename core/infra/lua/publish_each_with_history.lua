-- Publish one message on several channels, each with its history, atomically:
-- publish_with_history.lua once per channel, in one call (a REST write's two
-- change events). KEYS: stream and meta of each channel, in pairs. ARGV: data,
-- size, ttl seconds, a fresh epoch (for any history that is gone or not to be
-- trusted), then the Redis channel of each pair. Returns offset and epoch of
-- each, in order. Not for a Redis Cluster: the channels' keys live in different slots.
local data, size, ttl, fresh = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local rid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or ''
local out = {}
for i = 1, #KEYS / 2 do
    local stream, meta = KEYS[2 * i - 1], KEYS[2 * i]
    local kept = redis.call('HMGET', meta, 'e', 'r')
    local epoch = kept[1]
    if not epoch or (kept[2] and kept[2] ~= rid) then
        epoch = (epoch and '~' or '') .. fresh -- as publish_with_history.lua
        redis.call('DEL', stream)
        redis.call('HSET', meta, 'e', epoch, 'o', 0, 'r', rid)
    elseif not kept[2] then
        redis.call('HSET', meta, 'r', rid)
    end
    local offset = redis.call('HINCRBY', meta, 'o', 1)
    local added = redis.pcall('XADD', stream, 'MAXLEN', size, offset .. '-1', 'd', data)
    if type(added) == 'table' and added.err then
        epoch, offset = '~' .. fresh, 1 -- as publish_with_history.lua
        redis.call('DEL', stream)
        redis.call('HSET', meta, 'e', epoch, 'o', offset, 'r', rid)
        redis.call('XADD', stream, 'MAXLEN', size, '1-1', 'd', data)
    end
    redis.call('EXPIRE', stream, ttl)
    redis.call('EXPIRE', meta, ttl)
    redis.call('PUBLISH', ARGV[4 + i], '\30' .. offset .. ' ' .. epoch .. ' ' .. data)
    out[2 * i - 1] = offset
    out[2 * i] = epoch
end
return out
