-- A sync's first step in a content shard of a Redis Cluster, where the lock is in another slot:
-- raise the shard's fence floor to the sync's fence, so that no older sync acts on the shard
-- from then on, then read the shard's unsettled batch and take its dirty set. Strict: a floor
-- already at this fence means another sync holds the same fence (Redis lost the counter), and
-- the caller must move its fence past the floor returned.
-- KEYS: 1 fence floor, 2 batch hash, 3 the run's contents, 4 the dirty set.  ARGV: 1 fence.
-- Returns {0, floor} when refused; else {1, unsettled batch id or "", its start or "",
-- contents of the run}.
-- include: merge_dirty
local floor = tonumber(redis.call('GET', KEYS[1])) or 0
local fence = tonumber(ARGV[1])
if fence <= floor then
  return {0, floor}
end
redis.call('SET', KEYS[1], fence)
local batch = redis.call('HMGET', KEYS[2], 'id', 'started')
return {1, batch[1] or '', batch[2] or '', merge_dirty(KEYS[3], KEYS[4])}
