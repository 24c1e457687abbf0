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
--       then per view 10 keys: pending counter, syncing counter, cached database count,
--       the viewer's session hash (a field per content, see below), daily counter of the
--       viewer, days hash, viewers HyperLogLog of the day, ranking of the day, blocked counts of
--       the day, and the pair's session hash of earlier versions (fields n, s, l);
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
-- A viewer's sessions are one hash, a field per content ("{type}:{id}", the dirty member) whose
-- value is "n:s:d": views this session, the session's start, and the last counted view as an
-- offset from the start. One hash per viewer keeps a pair in about a third of the memory of a
-- key per pair. The hash lives as long as its longest-lived field needs; a field no rule can use
-- any more is pruned when a new field brings the hash to 16, 32, 64... fields.
-- Earlier versions kept a hash per pair (the last key of a view): it is read as well, the more
-- recent of the two states wins, and a counted view moves the pair into the viewer's hash.

local session_limit = tonumber(ARGV[1])
local session_seconds = tonumber(ARGV[2])
local daily_limit = tonumber(ARGV[3])
local one_per_day = ARGV[4] == '1'
local cooldown = tonumber(ARGV[5])
local uniques = ARGV[7] == '1'
local views_in_batch = (#ARGV - 7) / 13
local next_marker = 4 + 10 * views_in_batch
-- How long after its session's start and its last counted view a field can still decide a
-- view: the session window, the cooldown, a day (25 h with a DST change) and the hour of grace
-- the keys' TTLs get. Only pruning uses it; the rules never do.
local field_life = math.max(session_limit > 0 and session_seconds or 0, cooldown, 90000) + 3600

-- A viewer's session for one content: views this session, its start and the last counted view,
-- or 0, nil, nil when the hash has no (readable) field for it.
local function session_of(key, field)
  local packed = redis.call('HGET', key, field)
  if packed then
    local n, s, d = string.match(packed, '^(%d+):(%-?%d+):(%-?%d+)$')
    if n then
      return tonumber(n), tonumber(s), tonumber(s) + tonumber(d)
    end
  end
  return 0, nil, nil
end

-- Drop the fields of a viewer's hash that no rule can use at ``now`` any more.
local function prune(key, now)
  local fields = redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    local _, s, d = string.match(fields[i + 1], '^(%d+):(%-?%d+):(%-?%d+)$')
    if s == nil or now >= math.max(tonumber(s), tonumber(s) + tonumber(d)) + field_life then
      redis.call('HDEL', key, fields[i])
    end
  end
end

-- Write one content's session into the viewer's hash, which then lives at least ``ttl`` more
-- seconds, never less than it had: another content's session may need longer. A live view's
-- expiry (its day's end or its session's, plus the grace) is never earlier than an earlier
-- view's; only a replayed view, made in the past, can bring an earlier one.
local function save_session(key, field, views, start, last, ttl, now, replayed)
  local added = redis.call('HSET', key, field, views .. ':' .. start .. ':' .. (last - start))
  if not replayed or redis.call('TTL', key) < ttl then
    redis.call('EXPIRE', key, ttl)
  end
  if added == 1 then
    local size, mark = redis.call('HLEN', key), 16
    while mark < size do
      mark = mark * 2
    end
    if size == mark then
      prune(key, now)
    end
  end
end

local reason_names = {'cooldown', 'viewed_today', 'session_limit', 'daily_limit'}
local out = {0, ''}

for v = 0, views_in_batch - 1 do
  local k, a = 3 + 10 * v, 7 + 13 * v
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
    local views, start, last = session_of(KEYS[k + 4], ARGV[a + 6])
    local earlier = redis.call('HMGET', KEYS[k + 10], 'n', 's', 'l')
    local earlier_last = tonumber(earlier[3])
    if earlier_last ~= nil and (last == nil or earlier_last > last) then
      views, start, last = tonumber(earlier[1]) or 0, tonumber(earlier[2]), earlier_last
    end
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
      save_session(KEYS[k + 4], ARGV[a + 6], views + 1, start, math.max(now, last or now),
        tonumber(ARGV[a + 4]), now, ARGV[a + 7] == '1')
      if earlier_last ~= nil then
        redis.call('DEL', KEYS[k + 10])
      end
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
