-- Decide every abuse rule for one view and, if all pass, count it; return the combined count.
-- Runs atomically, so concurrent identical requests cannot both pass a rule that admits one.
-- Rules are decided against ARGV now (whole seconds, from the caller's clock), never Redis'
-- clock: TTLs only reclaim memory. A view replayed from the outage outbox carries its original
-- time, which may be older than the viewer's last counted view: "last" never moves backwards.
--
-- KEYS: 1 pending counter, 2 syncing counter, 3 cached database count, 4 session hash
--       (fields n = views this session, s = session start, l = last counted view; seconds),
--       5 daily counter of the viewer, 6 dirty set, 7 sync epoch, 8 sync batch hash,
--       9 (replays only) the event's replay marker
-- ARGV: 1 now, 2 session limit (0 = off), 3 session seconds, 4 daily limit (0 = off),
--       5 one view per day (0/1), 6 cooldown seconds (0 = off), 7 start of today (local midnight),
--       8 session hash TTL, 9 daily counter TTL, 10 dirty member, 11 end of today (next local
--       midnight), 12 (replays only) marker TTL
-- Returns {counted, reason, pending, syncing, cached database count or -1, epoch, batch id or ""},
-- or {-1} for a replayed event that was decided before (its marker exists).
-- Reasons, in the order they are checked: 1 cooldown, 2 viewed today, 3 session limit, 4 daily limit.
-- "Viewed today" needs no field of its own: the last counted view is at or after local midnight.

if KEYS[9] and not redis.call('SET', KEYS[9], '1', 'NX', 'EX', ARGV[12]) then
  return {-1}
end

local now = tonumber(ARGV[1])
local session_limit = tonumber(ARGV[2])
local session_seconds = tonumber(ARGV[3])
local daily_limit = tonumber(ARGV[4])
local cooldown = tonumber(ARGV[6])
local today_start = tonumber(ARGV[7])
local counted, reason = 0, 0

local state = redis.call('HMGET', KEYS[4], 'n', 's', 'l')
local views = tonumber(state[1]) or 0
local start = tonumber(state[2])
local last = tonumber(state[3])
if start == nil or now - start >= session_seconds then
  views, start = 0, now
end

if cooldown > 0 and last ~= nil and math.abs(now - last) < cooldown then
  reason = 1
elseif ARGV[5] == '1' and last ~= nil and last >= today_start and last < tonumber(ARGV[11]) then
  reason = 2
elseif session_limit > 0 and views >= session_limit then
  reason = 3
elseif daily_limit > 0 and (tonumber(redis.call('GET', KEYS[5])) or 0) >= daily_limit then
  reason = 4
else
  counted = 1
  redis.call('HSET', KEYS[4], 'n', views + 1, 's', start, 'l', math.max(now, last or now))
  redis.call('EXPIRE', KEYS[4], ARGV[8])
  if daily_limit > 0 then
    redis.call('INCR', KEYS[5])
    redis.call('EXPIRE', KEYS[5], ARGV[9])
  end
  redis.call('INCR', KEYS[1])
  redis.call('SADD', KEYS[6], ARGV[10])
end

return {
  counted,
  reason,
  tonumber(redis.call('GET', KEYS[1])) or 0,
  tonumber(redis.call('GET', KEYS[2])) or 0,
  tonumber(redis.call('GET', KEYS[3])) or -1,
  tonumber(redis.call('GET', KEYS[7])) or 0,
  redis.call('HGET', KEYS[8], 'id') or '',
}
