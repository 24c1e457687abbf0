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
--       then per view 14 values: now, start of its day, end of its day (local midnights),
--       session TTL, daily counter TTL, dirty member, marked (0/1), day name (YYYY-MM-DD),
--       content id, viewer, crawler (0/1), TTL of the day's keys (seconds), when it is written
--       (the caller's clock, seconds; "" for a live view: its "now"), daily quota.
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
-- value is "n:s:d:e": views this session, the session's start, the last counted view and the
-- field's expiry, these two as offsets from the start. One hash per viewer keeps a pair in about
-- half the memory of a key per pair. A field expires as the key of a pair did: its session TTL
-- after it was written, on the caller's clock (a replayed view is written now, though made in
-- the past); an expired field is no session at all, whether or not it was pruned yet. Expired
-- fields are pruned when a new field brings the hash to its prune mark (field "~": twice the
-- fields left by the last pruning, at least 16), so that pruning costs little per view.
-- Earlier versions kept a hash per pair (the last key of a view): it is read as well, the more
-- recent of the two states wins, and a counted view moves the pair into the viewer's hash.

local session_limit = tonumber(ARGV[1])
local session_seconds = tonumber(ARGV[2])
local daily_limit = tonumber(ARGV[3])
local one_per_day = ARGV[4] == '1'
local cooldown = tonumber(ARGV[5])
local uniques = ARGV[7] == '1'
local views_in_batch = (#ARGV - 7) / 14
local next_marker = 4 + 10 * views_in_batch
local session_field = '^(%d+):(%-?%d+):(%-?%d+):(%-?%d+)$'  -- n:s:d:e

-- A viewer's session for one content at ``written`` (the caller's clock): views this session,
-- its start, the last counted view and the field's expiry, or 0, nil, nil, nil when the hash has
-- no live field for it.
local function session_of(key, field, written)
  local packed = redis.call('HGET', key, field)
  if packed then
    local n, s, d, e = string.match(packed, session_field)
    if n and written < tonumber(s) + tonumber(e) then
      return tonumber(n), tonumber(s), tonumber(s) + tonumber(d), tonumber(s) + tonumber(e)
    end
  end
  return 0, nil, nil, nil
end

-- Drop the fields of a viewer's hash that expired by ``written``; set the next prune mark.
local function prune(key, written)
  local fields = redis.call('HGETALL', key)
  local left = 0
  for i = 1, #fields, 2 do
    if fields[i] ~= '~' then
      local _, s, _, e = string.match(fields[i + 1], session_field)
      if s == nil or written >= tonumber(s) + tonumber(e) then
        redis.call('HDEL', key, fields[i])
      else
        left = left + 1
      end
    end
  end
  redis.call('HSET', key, '~', math.max(16, 2 * left))
end

-- Write one content's session into the viewer's hash at ``written``: the field expires ``ttl``
-- seconds later, or when it expired before if that is later (a view replayed from the past
-- needs less than the live view before it did), and the hash lives at least that long, never
-- less than it had (another content's field may need longer).
local function save_session(key, field, views, start, last, ttl, written, expiry)
  expiry = math.max(written + ttl, expiry or 0)
  local value = views .. ':' .. start .. ':' .. (last - start) .. ':' .. (expiry - start)
  local added = redis.call('HSET', key, field, value)
  if redis.call('TTL', key) < expiry - written then
    redis.call('EXPIRE', key, expiry - written)
  end
  if added == 1 then
    local size = redis.call('HLEN', key)
    if size >= 16 and size >= (tonumber(redis.call('HGET', key, '~')) or 16) then
      prune(key, written)
    end
  end
end

local reason_names = {'cooldown', 'viewed_today', 'session_limit', 'daily_limit'}
local out = {0, ''}

for v = 0, views_in_batch - 1 do
  local k, a = 3 + 10 * v, 7 + 14 * v
  local quota = ARGV[a + 14]
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
    local written = tonumber(ARGV[a + 13]) or now
    local views, start, last, expiry = session_of(KEYS[k + 4], ARGV[a + 6], written)
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
        tonumber(ARGV[a + 4]), written, expiry)
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
