-- Publish one message on several channels, each with its history, atomically:
-- publish_with_history.lua once per channel, in one call (a REST write's two
-- change events). KEYS: stream and meta of each channel, in pairs. ARGV: data,
-- size, ttl seconds, a fresh epoch (for any history that is gone or not to be
-- trusted), then the Redis channel of each pair, then optionally an id of this
-- call (as publish_with_history.lua's: sent again, it publishes nothing twice).
-- Returns offset and epoch of each, in order. Not for a Redis Cluster: the
-- channels' keys live in different slots.
local KEEP = 8 -- as publish_with_history.lua
local data, size, ttl, fresh = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local id = ARGV[5 + #KEYS / 2]
local rid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or ''
local out = {}
for i = 1, #KEYS / 2 do
    local stream, meta = KEYS[2 * i - 1], KEYS[2 * i]
    local kept = redis.call('HMGET', meta, 'e', 'r', 'o', 'u')
    local epoch, top, done = kept[1], tonumber(kept[3]) or 0, kept[4] or ''
    local offset = nil
    if not epoch or (kept[2] and kept[2] ~= rid) then
        epoch = (epoch and '~' or '') .. fresh -- as publish_with_history.lua
        top, done = 0, ''
        redis.call('HSET', meta, 'e', epoch) -- first, as publish_with_history.lua
        redis.call('DEL', stream)
    elseif id then
        local _, at = string.find(done, ';' .. id .. '=', 1, true)
        if at then -- this very call, sent again: it ran
            offset = tonumber(string.match(done, '^%d+', at + 1))
        end
    end
    if not offset then
        offset = top + 1
        local added = redis.pcall('XADD', stream, 'MAXLEN', size, offset .. '-1', 'd', data)
        if type(added) == 'table' and added.err then
            -- as publish_with_history.lua: a refused write fails the call (the first
            -- write of the call: nothing was written), a foreign key starts again
            if not (string.find(added.err, '^WRONGTYPE') or string.find(added.err, 'or smaller', 1, true)) then
                return redis.error_reply(added.err)
            end
            epoch, offset, done = '~' .. fresh, 1, ''
            redis.call('HSET', meta, 'e', epoch)
            redis.call('DEL', stream)
            redis.call('XADD', stream, 'MAXLEN', size, '1-1', 'd', data)
        end
        if id then
            local cut = 0
            for _ = 1, KEEP do -- as publish_with_history.lua
                cut = string.find(done, ';', cut + 1, true)
                if not cut then
                    break
                end
            end
            if cut then
                done = string.sub(done, 1, cut - 1)
            end
            redis.call('HSET', meta, 'o', offset, 'r', rid, 'u', ';' .. id .. '=' .. offset .. done)
        else
            redis.call('HSET', meta, 'o', offset, 'r', rid)
        end
        redis.call('EXPIRE', stream, ttl)
        redis.call('EXPIRE', meta, ttl)
        redis.call('PUBLISH', ARGV[4 + i], '\30' .. offset .. ' ' .. epoch .. ' ' .. data)
    end
    out[2 * i - 1] = offset
    out[2 * i] = epoch
end
return out
