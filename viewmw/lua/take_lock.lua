-- Take the sync lock and, with it, the next fencing token.
-- The fence only ever grows, so a sync that took the lock later always holds a larger fence than
-- any sync before it: the batch and the database ledger remember the fence of the sync that owns
-- them, and refuse a sync holding an older one.
-- KEYS: 1 sync lock, 2 fence counter.  ARGV: 1 lock token, 2 lock expiry (ms).
-- Returns the new fence (>= 1), or 0 if another sync holds the lock.
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 0
end
return redis.call('INCR', KEYS[2])
