-- An expiring set (a sorted set: member -> until, Unix seconds): its members with their
-- untils, after forgetting those expired. KEYS[1] = the set; ARGV[1] = the reader's now.
-- Forgotten only up to the earlier of the reader's clock and this server's (TIME): a
-- reader whose clock runs ahead must not take from the others what is live for them
-- (a gateway an hour fast emptied the block list of every gateway). The reader leaves
-- out, on its side, what has expired by its own clock.
local t = redis.call('TIME')
local now = math.min(tonumber(ARGV[1]), tonumber(t[1]) + tonumber(t[2]) / 1000000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.17g', now))
return redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
