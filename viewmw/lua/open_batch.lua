-- Open a new batch, only for the lock holder and only when no batch is unsettled, so a sync whose
-- lock expired never leaves an empty batch behind. The batch records its owner's fence.
-- KEYS: 1 sync lock (on a cluster: the shard's fence floor, see holds_sync), 2 batch hash.
-- ARGV: 1 lock token, 2 batch id, 3 started (ISO 8601), 4 fence.
-- Returns 1, -1 if the caller does not hold the lock, -2 if a batch is unsettled.
-- include: holds_sync
if not holds_sync(KEYS[1], ARGV[1], ARGV[4]) then
  return -1
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return -2
end
redis.call('HSET', KEYS[2], 'id', ARGV[2], 'started', ARGV[3], 'fence', ARGV[4])
return 1
