-- Presence of a channel. KEYS: a hash (client -> entry JSON), a zset (client
-- -> expiry, Redis server time in ms) and a hash (user -> how many entries of
-- the first hash are theirs), so that `stats` counts clients and users
-- without reading a single entry. Every op first drops the expired entries
-- (a killed node's clients vanish by themselves, from the counts too).
-- ARGV[1]: the op; ARGV[2]: now-override in ms (or 0); then
--   add ttl-ms client entry [client entry ...]  add or refresh -> 1
--   remove client [client ...]                                 -> 1
--   read                                  client, entry, client, entry, ...
--   stats                                            {clients, users}
local room, expiry, users = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[2])
if now == 0 then
    local t = redis.call('TIME')
    now = t[1] * 1000 + math.floor(t[2] / 1000)
end

local function user_of(entry)
    local ok, decoded = pcall(cjson.decode, entry)
    if ok and type(decoded) == 'table' and type(decoded.user) == 'string' then
        return decoded.user
    end
    return ''
end

local function count(user, by)
    if redis.call('HINCRBY', users, user, by) <= 0 then
        redis.call('HDEL', users, user)
    end
end

-- Remove the clients of `list` from `first` on; each entry held is its user's less.
local function drop(list, first)
    for i = first, #list do
        local entry = redis.call('HGET', room, list[i])
        if entry then
            count(user_of(entry), -1)
            redis.call('HDEL', room, list[i])
        end
        redis.call('ZREM', expiry, list[i])
    end
end

drop(redis.call('ZRANGEBYSCORE', expiry, '-inf', now), 1)
local op = ARGV[1]
if op == 'add' then
    local ttl = tonumber(ARGV[3])
    for i = 4, #ARGV, 2 do
        local client, entry = ARGV[i], ARGV[i + 1]
        local old = redis.call('HGET', room, client)
        if old ~= entry then -- new, or changed (a refresh writes the same bytes)
            if old then
                count(user_of(old), -1)
            end
            count(user_of(entry), 1)
            redis.call('HSET', room, client, entry)
        end
        redis.call('ZADD', expiry, now + ttl, client)
    end
    for _, key in ipairs(KEYS) do -- the keys outlive every entry (never shortened)
        if redis.call('PTTL', key) < ttl then
            redis.call('PEXPIRE', key, ttl)
        end
    end
    return 1
elseif op == 'remove' then
    drop(ARGV, 3)
    return 1
elseif op == 'read' then
    return redis.call('HGETALL', room)
end
return {redis.call('ZCARD', expiry), redis.call('HLEN', users)}
