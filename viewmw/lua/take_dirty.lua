-- Move the dirty set into the run's own set, atomically; return how many contents the run has.
-- A set left by a run that died is merged, not lost. One slot: on a Redis Cluster both sets are
-- the same content shard's.
-- KEYS: 1 the run's contents, 2 the dirty set.
redis.call('SUNIONSTORE', KEYS[1], KEYS[1], KEYS[2])
redis.call('DEL', KEYS[2])
return redis.call('SCARD', KEYS[1])
