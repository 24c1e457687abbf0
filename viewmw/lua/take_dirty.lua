-- Move the dirty set into the run's own set, atomically; return how many contents the run has.
-- One slot: on a Redis Cluster both sets are the same content shard's (see claim_shard there).
-- KEYS: 1 the run's contents, 2 the dirty set.
-- include: merge_dirty
return merge_dirty(KEYS[1], KEYS[2])
