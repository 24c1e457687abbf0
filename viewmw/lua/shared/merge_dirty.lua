-- Shared by take_dirty and claim_shard: move the dirty set into the run's own set (a set left by
-- a run that died is merged, not lost); returns how many contents the run has.
local function merge_dirty(run, dirty)
  redis.call('SUNIONSTORE', run, run, dirty)
  redis.call('DEL', dirty)
  return redis.call('SCARD', run)
end
