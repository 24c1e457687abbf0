-- Decide every abuse rule for a batch of views, one after the other, and count those that pass;
-- return each view's outcome and its content's combined count. One view is a batch of one.
-- Runs atomically, so concurrent identical requests cannot both pass a rule that admits one, and
-- the views of a batch are decided in order, exactly as if each had been its own call.
-- Rules are decided against each view's own "now" (whole seconds, from the caller's clock), never
-- Redis' clock: TTLs only reclaim memory. A view replayed from the outage outbox carries its
-- original time, which may be older than the viewer's last counted view: "last" never moves back.
-- The per-day history is recorded in the same call: a counted view adds to its day in the
-- content's days hash (whose day fields always add up to the pending counter) and to the day's
-- ranking; an offered view goes into the day's HyperLogLog of viewers (when uniques are on); a
-- blocked one adds to the day's blocked counts. Day names come from the caller, never from Lua.
-- A crawler view skips the rules: it only adds to its day's crawler field and marks the content.
--
-- KEYS: 1 dirty set, 2 sync epoch, 3 sync batch hash,
--       then per view 9 keys: pending counter, syncing counter, cached database count,
--       session hash (fields n = views this session, s = session start, l = last counted view),
--       daily counter of the viewer, days hash, viewers HyperLogLog of the day, ranking of the
--       day, blocked counts of the day;
--       then one replay marker per view whose "marked" flag is 1, in the order of those views.
-- ARGV: 1 session limit (0 = off), 2 session seconds, 3 daily limit (0 = off),
--       4 one view per day (0/1), 5 cooldown seconds (0 = off), 6 replay marker TTL,
--       7 unique viewers (0/1),
--       then per view 13 values: now, start of its day, end of its day (local midnights),
--       session hash TTL, daily counter TTL, dirty member, marked (0/1), day name (YYYY-MM-DD),
--       content id, viewer, crawler (0/1), TTL of the day's keys (seconds), daily quota.
-- The daily quota is "" on a single Redis: the daily counter is a key of this call, checked and
-- counted here. On a Redis Cluster the counter is in the viewer's slot, not the content's, and
-- the view comes with reserve_daily.lua's answer instead: "r" reserved (the limit lets it pass;
-- nothing to count here) or "f" full (blocked by the daily limit, if no earlier rule blocks it);
-- its daily counter key is then any key of this call's slot, never touched.
-- Returns {epoch, batch id or "", then per view: counted, reason, pending, syncing,
--          cached database count or -1}; counted is -1 for a replayed view already decided.
-- Reasons, in the order they are checked: 1 cooldown, 2 viewed today, 3 session limit, 4 daily limit.
-- "Viewed today" needs no field of its own: the last counted view falls within the view's day.

local session_limit = tonumber(ARGV[1])
local session_seconds = tonumber(ARGV[2])
local daily_limit = tonumber(ARGV[3])
local one_per_day = ARGV[4] == '1'
local cooldown = tonumber(ARGV[5])
local uniques = ARGV[7] == '1'
local views_in_batch = (#ARGV - 7) / 13
local next_marker = 4 + 9 * views_in_batch
local reason_names = {'cooldown', 'viewed_today', 'session_limit', 'daily_limit'}
local out = {0, ''}

for v = 0, views_in_batch - 1 do
  local k, a = 3 + 9 * v, 7 + 13 * v
  local quota = ARGV[a + 13]
  local counted, reason = 0, 0
  if ARGV[a + 7] == '1' then
    if not redis.call('SET', KEYS[next_marker], '1', 'NX', 'EX', ARGV[6]) then
      counted = -1
    end
    next_marker = next_marker + 1
  end
  if counted == 0 and ARGV[a + 11] == '1' then
    redis.call('HINCRBY', KEYS[k + 6], ARGV[a + 8] .. ':c', 1)
    redis.call('SADD', KEYS[1], ARGV[a + 6])
  elseif counted == 0 then
    local now = tonumber(ARGV[a + 1])
    local state = redis.call('HMGET', KEYS[k + 4], 'n', 's', 'l')
    local views = tonumber(state[1]) or 0
    local start = tonumber(state[2])
    local last = tonumber(state[3])
    if start == nil or now - start >= session_seconds then
      views, start = 0, now
    end
    if cooldown > 0 and last ~= nil and math.abs(now - last) < cooldown then
      reason = 1
    elseif one_per_day and last ~= nil and last >= tonumber(ARGV[a + 2])
        and last < tonumber(ARGV[a + 3]) then
      reason = 2
    elseif session_limit > 0 and views >= session_limit then
      reason = 3
    elseif daily_limit > 0 and (quota == 'f' or quota == ''
        and (tonumber(redis.call('GET', KEYS[k + 5])) or 0) >= daily_limit) then
      reason = 4
    else
      counted = 1
      redis.call('HSET', KEYS[k + 4], 'n', views + 1, 's', start, 'l', math.max(now, last or now))
      redis.call('EXPIRE', KEYS[k + 4], ARGV[a + 4])
      if daily_limit > 0 and quota == '' then
        redis.call('INCR', KEYS[k + 5])
        redis.call('EXPIRE', KEYS[k + 5], ARGV[a + 5])
      end
      redis.call('INCR', KEYS[k + 1])
      redis.call('HINCRBY', KEYS[k + 6], ARGV[a + 8], 1)
      redis.call('ZINCRBY', KEYS[k + 8], 1, ARGV[a + 9])
      redis.call('EXPIRE', KEYS[k + 8], ARGV[a + 12])
      redis.call('SADD', KEYS[1], ARGV[a + 6])
    end
    if reason > 0 then
      redis.call('HINCRBY', KEYS[k + 9], reason_names[reason], 1)
      redis.call('EXPIRE', KEYS[k + 9], ARGV[a + 12])
    end
    if uniques then
      -- PFADD answers 0 only when the key exists and took no change: its TTL was set when
      -- it was created (and is the same moment whenever it is set: the end of its day plus
      -- the retention), so a viewer already in it costs no EXPIRE.
      if redis.call('PFADD', KEYS[k + 7], ARGV[a + 10]) == 1 then
        redis.call('EXPIRE', KEYS[k + 7], ARGV[a + 12])
      end
      if reason > 0 then
        -- The day's viewers reach the history even when none of them was counted.
        redis.call('HINCRBY', KEYS[k + 6], ARGV[a + 8], 0)
        redis.call('SADD', KEYS[1], ARGV[a + 6])
      end
    end
  end
  out[#out + 1] = counted
  out[#out + 1] = reason
  out[#out + 1] = tonumber(redis.call('GET', KEYS[k + 1])) or 0
  out[#out + 1] = tonumber(redis.call('GET', KEYS[k + 2])) or 0
  out[#out + 1] = tonumber(redis.call('GET', KEYS[k + 3])) or -1
end

out[1] = tonumber(redis.call('GET', KEYS[2])) or 0
out[2] = redis.call('HGET', KEYS[3], 'id') or ''
return out
