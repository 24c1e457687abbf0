-- Cache database counts read after a miss, unless a sync moved views since the read began.
-- The epoch changes whenever a sync snapshots or settles, so an unchanged epoch proves that the
-- counts read from the database (already corrected for the batch that was unsettled then) are
-- still the database's share of the total.
-- KEYS: 1 sync epoch, then per content: pending, syncing, cached database count
-- ARGV: 1 epoch seen before the database read, 2 cache TTL (seconds), then per content: the
--       database count. The TTL bounds how long a count changed behind Redis' back (by the
--       database fallback of a process that stopped before Redis came back) can stay stale.
-- Returns {1, then per content: pending, syncing, cached count} or {0} when the epoch moved.
if (tonumber(redis.call('GET', KEYS[1])) or 0) ~= tonumber(ARGV[1]) then
  return {0}
end
local out = {1}
for i = 2, #KEYS, 3 do
  local database = ARGV[(i + 1) / 3 + 2]
  redis.call('SET', KEYS[i + 2], database, 'NX', 'EX', ARGV[2])
  out[#out + 1] = tonumber(redis.call('GET', KEYS[i])) or 0
  out[#out + 1] = tonumber(redis.call('GET', KEYS[i + 1])) or 0
  out[#out + 1] = tonumber(redis.call('GET', KEYS[i + 2])) or 0
end
return out
