-- Estimate distinct viewers of groups of days of one content type, and read the sync epoch.
-- Each group is one content's live HyperLogLogs (a run of the days still in Redis) and the
-- sketches the history kept (written into scratch keys), merged by one PFCOUNT, which counts
-- each viewer once across the days. The scratch keys are shared by the groups (each group uses
-- as many as it has sketches) and deleted before the call returns. The epoch lets the caller
-- check, in this same round trip, that no sync moved views since it read them.
-- KEYS: 1 sync epoch, then as many scratch keys as the group with the most sketches has.
-- ARGV: 1 a content's HyperLogLog of a day as a string.format template of (type, day, id),
--       2 content type, 3 number of live days, 4 number of groups, then the live days, then per
--       group: content id, its first live day (1-based), how many live days, how many sketches;
--       then every sketch, in order.
-- Returns {epoch, estimate per group}.
local template, content_type = ARGV[1], ARGV[2]
local day_count = tonumber(ARGV[3])
local groups = tonumber(ARGV[4])
local scratch = #KEYS - 1
local group_arg = 5 + day_count
local sketch_arg = group_arg + 4 * groups
local out = {tonumber(redis.call('GET', KEYS[1])) or 0}
for g = 1, groups do
  local content_id = ARGV[group_arg]
  local first_day = tonumber(ARGV[group_arg + 1])
  local live = tonumber(ARGV[group_arg + 2])
  local kept = tonumber(ARGV[group_arg + 3])
  group_arg = group_arg + 4
  local names = {}
  for d = first_day, first_day + live - 1 do
    names[#names + 1] = string.format(template, content_type, ARGV[4 + d], content_id)
  end
  for n = 1, kept do
    redis.call('SET', KEYS[1 + n], ARGV[sketch_arg], 'PX', 60000)
    names[#names + 1] = KEYS[1 + n]
    sketch_arg = sketch_arg + 1
  end
  if #names == 0 then
    out[g + 1] = 0
  else
    out[g + 1] = redis.call('PFCOUNT', unpack(names))
  end
end
if scratch > 0 then
  local names = {}
  for n = 1, scratch do
    names[n] = KEYS[1 + n]
  end
  redis.call('DEL', unpack(names))
end
return out
