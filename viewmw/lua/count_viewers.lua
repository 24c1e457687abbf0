-- Estimate distinct viewers of groups of days of one content type, and read the sync epoch.
-- Each group is one content's live HyperLogLogs (a run of the days still in Redis) and the
-- sketches the history kept, merged by one PFCOUNT, which counts each viewer once across the
-- days. Kept sketches come as arguments and go into scratch keys, shared by the groups (each
-- group uses as many as it has sketches) and deleted before the call returns. The epoch lets
-- the caller check, in this same round trip, that no sync moved views since it read them.
-- A group may also name a merged sketch of its kept days (mode 1: use it if it exists, else
-- answer -1 and the caller sends the sketches; mode 2: merge the sketches sent into it, for
-- the next reads). Its name carries the epoch the caller read, and it is written only while
-- the epoch is still that one: a sync writes the history only after it moved the epoch, so a
-- merged sketch is never older than the history of its epoch.
-- KEYS: 1 sync epoch, then the merged sketch of each group that has a mode, in order, then as
--       many scratch keys as the group with the most sketches has.
-- ARGV: 1 a content's HyperLogLog of a day as a string.format template of (type, day, id),
--       2 content type, 3 number of live days, 4 number of groups, 5 the epoch the caller read
--       (the merged sketches' epoch), 6 a merged sketch's TTL (ms), then the live days, then per
--       group: content id, its first live day (1-based), how many live days, how many
--       sketches, mode (0 none, 1 use, 2 write); then every sketch, in order.
-- Returns {epoch, estimate per group (-1: mode 1 and no merged sketch)}.
local template, content_type = ARGV[1], ARGV[2]
local day_count = tonumber(ARGV[3])
local groups = tonumber(ARGV[4])
local merged_ttl = ARGV[6]
local group_arg = 7 + day_count
local sketch_arg = group_arg + 5 * groups
local epoch = tonumber(redis.call('GET', KEYS[1])) or 0
local current = tostring(epoch) == ARGV[5]
local out = {epoch}
local merged_count = 0
for g = 0, groups - 1 do
  if ARGV[group_arg + 5 * g + 4] ~= '0' then
    merged_count = merged_count + 1
  end
end
local scratch = 1 + merged_count  -- the last key before the first scratch key
local scratch_used = 0
local next_merged = 1
for g = 1, groups do
  local content_id = ARGV[group_arg]
  local first_day = tonumber(ARGV[group_arg + 1])
  local live = tonumber(ARGV[group_arg + 2])
  local kept = tonumber(ARGV[group_arg + 3])
  local mode = ARGV[group_arg + 4]
  group_arg = group_arg + 5
  local merged
  if mode ~= '0' then
    next_merged = next_merged + 1
    merged = KEYS[next_merged]
  end
  local names = {}
  for d = first_day, first_day + live - 1 do
    names[#names + 1] = string.format(template, content_type, ARGV[6 + d], content_id)
  end
  local missing = false
  if mode == '1' then
    if redis.call('EXISTS', merged) == 1 then
      names[#names + 1] = merged
    else
      missing = true
    end
  else
    local sketches = {}
    for n = 1, kept do
      redis.call('SET', KEYS[scratch + n], ARGV[sketch_arg], 'PX', 60000)
      sketches[n] = KEYS[scratch + n]
      sketch_arg = sketch_arg + 1
    end
    scratch_used = math.max(scratch_used, kept)
    if mode == '2' and current then
      if kept > 0 then
        redis.call('PFMERGE', merged, unpack(sketches))
      else
        -- An empty one: a content with no kept sketch need not be asked for them again.
        redis.call('PFADD', merged)
      end
      redis.call('PEXPIRE', merged, merged_ttl)
      names[#names + 1] = merged
    else
      for n = 1, kept do
        names[#names + 1] = sketches[n]
      end
    end
  end
  if missing then
    out[g + 1] = -1
  elseif #names == 0 then
    out[g + 1] = 0
  else
    out[g + 1] = redis.call('PFCOUNT', unpack(names))
  end
end
if scratch_used > 0 then
  local names = {}
  for n = 1, scratch_used do
    names[n] = KEYS[scratch + n]
  end
  redis.call('DEL', unpack(names))
end
return out
