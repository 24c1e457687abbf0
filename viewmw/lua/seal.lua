-- Seal the unsettled batch before it is committed, and make it the caller's: from now on its
-- items never change, and only a sync holding this fence may read, commit or settle them.
-- Only the lock holder may seal, so a sync whose lock expired can neither seal a batch nor read
-- one that the sync holding the lock is still filling; snapshot.lua refuses to add to a sealed
-- batch. Sealing again (a recovery after a crash) hands the batch to the recovering sync's fence,
-- so the sync that left it can no longer touch it.
-- A batch left by a version that kept every batch's items in one shared hash gets its items
-- moved under its own id.
-- KEYS: 1 sync lock (on a cluster: the shard's fence floor, see holds_sync), 2 batch hash, 3 this batch's items, 4 the former shared items hash.
-- ARGV: 1 lock token, 2 batch id, 3 fence.
-- Returns 1, or -1 if the caller does not hold the lock or the batch is not the unsettled one.
-- include: holds_sync
if not holds_sync(KEYS[1], ARGV[1], ARGV[3]) or redis.call('HGET', KEYS[2], 'id') ~= ARGV[2] then
  return -1
end
if redis.call('EXISTS', KEYS[4]) == 1 and redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('RENAME', KEYS[4], KEYS[3])
end
redis.call('HSET', KEYS[2], 'sealed', '1', 'fence', ARGV[3])
return 1
