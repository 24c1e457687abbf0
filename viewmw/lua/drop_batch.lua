-- Delete the unsettled batch if it is empty and still the caller's (lock, id and fence): a batch
-- with items is never dropped, and a sync whose lock expired never drops another sync's batch.
-- KEYS: 1 sync lock (on a cluster: the shard's fence floor, see holds_sync), 2 batch hash, 3 this batch's items.  ARGV: 1 lock token, 2 batch id, 3 fence.
-- Returns 1 dropped, 0 the batch has items, -1 the caller does not own the batch.
-- include: holds_sync
if not holds_sync(KEYS[1], ARGV[1], ARGV[3]) or redis.call('HGET', KEYS[2], 'id') ~= ARGV[2]
    or redis.call('HGET', KEYS[2], 'fence') ~= ARGV[3] then
  return -1
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
redis.call('DEL', KEYS[2])
return 1
