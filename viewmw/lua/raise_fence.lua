-- Move the fence counter above a floor (the fence the database last saw), for the lock holder.
-- Needed once Redis lost the counter (a flush, a new server): the next fence must still be newer
-- than every fence the database accepted, or each commit would be refused as stale.
-- KEYS: 1 sync lock, 2 fence counter.  ARGV: 1 lock token, 2 floor.
-- Returns the holder's new fence, or -1 if the caller does not hold the lock.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local fence = math.max(tonumber(redis.call('GET', KEYS[2])) or 0, tonumber(ARGV[2])) + 1
redis.call('SET', KEYS[2], fence)
return fence
