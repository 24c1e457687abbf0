-- Seal the unsettled batch before it is committed: from now on its items never change.
-- Only the lock holder may seal, so a sync whose lock expired can neither seal a batch nor read
-- one that the sync holding the lock is still filling; snapshot.lua refuses to add to a sealed
-- batch. Sealing twice (a recovery after a crash) is harmless.
-- KEYS: 1 sync lock, 2 batch hash.  ARGV: 1 lock token, 2 batch id.
-- Returns 1, or -1 if the caller does not hold the lock or the batch is not the unsettled one.
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('HGET', KEYS[2], 'id') ~= ARGV[2] then
  return -1
end
redis.call('HSET', KEYS[2], 'sealed', '1')
return 1
