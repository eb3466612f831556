-- Report the live connections of a lost node, each exactly once whoever claims
-- (docs/events.md). KEYS as events_append.lua. ARGV: node, maxlen, the most to report.
-- Each connection's recorded disconnect event (a JSON object) is appended with a
-- last member "ts" (server time, ms) and forgotten; the node is forgotten once
-- none is left. Returns {events appended, 1 if the node is forgotten else 0}:
-- {{}, 0} when its mark has not expired (it is alive, or already claimed).
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local expires = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not expires or tonumber(expires) > now then
    return {{}, 0}
end
local ts = ',"ts":' .. string.format('%.0f', now) .. '}'
local found = redis.call('HRANDFIELD', KEYS[3], tonumber(ARGV[3]), 'WITHVALUES')
local events = {}
for i = 1, #found, 2 do
    local event = string.sub(found[i + 1], 1, -2) .. ts
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'event', event)
    redis.call('HDEL', KEYS[3], found[i])
    events[#events + 1] = event
end
if redis.call('HLEN', KEYS[3]) > 0 then
    return {events, 0}
end
redis.call('ZREM', KEYS[2], ARGV[1])
return {events, 1}
