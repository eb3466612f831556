-- Where a channel's history stands: {epoch, last offset}, or {} when it has
-- none. KEYS: stream, meta. ARGV: a fresh epoch. The gateway reads the entries
-- in the same transaction (MULTI, this, XRANGE); on a Redis Cluster, whose
-- pipelines carry no scripts, a variant of this script reads them itself
-- (core/infra/broker/cluster.py). A history written by another Redis than this
-- one (a failover, a restart from a snapshot: see publish_with_history.lua)
-- may lack its last entries: it starts a new epoch here as it would there.
local meta = redis.call('HMGET', KEYS[2], 'e', 'o', 'r')
if not meta[1] then
    return {}
end
if meta[3] then
    local rid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or ''
    if meta[3] ~= rid then
        local epoch = '~' .. ARGV[1] -- as publish_with_history.lua
        redis.call('DEL', KEYS[1])
        redis.call('HSET', KEYS[2], 'e', epoch, 'o', 0, 'r', rid)
        return {epoch, 0}
    end
end
return {meta[1], meta[2]}
