-- Estimate distinct viewers of groups of days: each group's live HyperLogLogs (the days still in
-- Redis) and the sketches the history kept (written into scratch keys) are merged by one PFCOUNT
-- per group, which counts each viewer once across the days. Scratch keys are deleted before the
-- call returns.
-- KEYS: per group, its live keys then its scratch keys.
-- ARGV: 1 number of groups, then per group: live keys, sketches; then every sketch, in order.
-- Returns {estimate per group}.
local groups = tonumber(ARGV[1])
local sketch_arg = 2 + 2 * groups
local key = 1
local out = {}
for g = 1, groups do
  local live = tonumber(ARGV[2 * g])
  local kept = tonumber(ARGV[2 * g + 1])
  local names = {}
  for n = 1, live do
    names[#names + 1] = KEYS[key]
    key = key + 1
  end
  local scratch = {}
  for n = 1, kept do
    redis.call('SET', KEYS[key], ARGV[sketch_arg], 'PX', 60000)
    names[#names + 1] = KEYS[key]
    scratch[#scratch + 1] = KEYS[key]
    key = key + 1
    sketch_arg = sketch_arg + 1
  end
  if #names == 0 then
    out[g] = 0
  else
    out[g] = redis.call('PFCOUNT', unpack(names))
  end
  if #scratch > 0 then
    redis.call('DEL', unpack(scratch))
  end
end
return out
