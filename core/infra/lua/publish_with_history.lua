-- Append to a channel's history and publish, atomically.
-- KEYS: stream, meta. ARGV: Redis channel, data, size, ttl seconds, a fresh
-- epoch (used when the history is gone or not to be trusted), and optionally
-- an id of this call (below). Backends in other languages may run it (EVALSHA)
-- to publish with history; docs/protocol.md gives the recipe. A Redis Cluster
-- runs its sharded-publish variant (core/infra/broker/cluster.py).
--
-- The meta keeps the replication id of the Redis that wrote it ('r'). Another
-- id means this data went through a failover (a promoted replica) or a restart
-- from a snapshot, either of which may have lost the last publications after
-- they were delivered and acknowledged: the channel then starts a new epoch, so
-- that clients are told (recovered: false) instead of their offsets being reused.
-- Such an epoch starts with '~', so that a gateway that sees its first
-- publication knows something may have been lost before it (an epoch begun
-- because the history expired does not).
--
-- A caller whose connection was lost before the answer came sends the call once
-- more, not knowing whether it ran. With an id (ARGV[6]: unique to the call, the
-- same when it is sent again; 16 random hex digits, say), the meta keeps the ids
-- of the channel's last KEEP publications with their offsets ('u', as
-- ';<id>=<offset>' each, the newest first), and a call whose id is among them is
-- answered with that publication's position: nothing is published twice.
local KEEP = 8
local id = ARGV[6]
local rid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or ''
local meta = redis.call('HMGET', KEYS[2], 'e', 'r', 'o', 'u')
local epoch, top, done = meta[1], tonumber(meta[3]) or 0, meta[4] or ''
if not epoch or (meta[2] and meta[2] ~= rid) then
    epoch = (epoch and '~' or '') .. ARGV[5]
    top, done = 0, ''
    -- HSET first: a script's first write is the one Redis refuses past maxmemory
    -- (after it, the script must run to its end), and DEL is never refused.
    redis.call('HSET', KEYS[2], 'e', epoch)
    redis.call('DEL', KEYS[1])
elseif id then
    local _, at = string.find(done, ';' .. id .. '=', 1, true)
    if at then -- this very call, sent again: it ran
        return {tonumber(string.match(done, '^%d+', at + 1)), epoch}
    end
end
local offset = top + 1
local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', ARGV[3], offset .. '-1', 'd', ARGV[2])
if type(added) == 'table' and added.err then
    -- Redis refused the write (OOM past maxmemory, READONLY on a replica, MISCONF):
    -- nothing was written, so the publication fails and the history stays as it is.
    if not (string.find(added.err, '^WRONGTYPE') or string.find(added.err, 'or smaller', 1, true)) then
        return redis.error_reply(added.err)
    end
    -- Something else wrote the key: an entry with an id of its own (XADD *) is
    -- past this offset, or the key is not a stream. What it holds cannot be told
    -- from this channel's publications, so the history starts again, untrusted.
    epoch, offset, done = '~' .. ARGV[5], 1, ''
    redis.call('HSET', KEYS[2], 'e', epoch)
    redis.call('DEL', KEYS[1])
    redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], '1-1', 'd', ARGV[2])
end
-- The replication id too: a meta kept by an older release (without one) adopts it.
if id then
    local cut = 0
    for _ = 1, KEEP do -- the KEEP-th ";" starts the first entry let go
        cut = string.find(done, ';', cut + 1, true)
        if not cut then
            break
        end
    end
    if cut then
        done = string.sub(done, 1, cut - 1)
    end
    redis.call('HSET', KEYS[2], 'o', offset, 'r', rid, 'u', ';' .. id .. '=' .. offset .. done)
else
    redis.call('HSET', KEYS[2], 'o', offset, 'r', rid)
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[1], '\30' .. offset .. ' ' .. epoch .. ' ' .. ARGV[2])
return {offset, epoch}
