-- Shared by the sync's batch scripts: scripts.py puts it in place of their
-- "-- include: holds_sync" line.
-- Whether the caller may still act as the sync. On a single Redis the key is the sync lock and
-- the caller must hold it (its token). On a Redis Cluster the lock is in another slot, so the
-- caller passes no token ("") and the key is its content shard's fence floor: the newest fence
-- that has acted on the shard. A caller with an older fence is refused (a newer sync has taken
-- over); otherwise the floor is raised to the caller's fence, so from then on no older sync can
-- change anything in the shard. The database's fence check and the ledger stay the last guards.
local function holds_sync(key, token, fence)
  if token ~= '' then
    return redis.call('GET', key) == token
  end
  local floor = tonumber(redis.call('GET', key)) or 0
  fence = tonumber(fence)
  if fence < floor then
    return false
  end
  if fence > floor then
    redis.call('SET', key, fence)
  end
  return true
end
