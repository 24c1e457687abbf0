-- The daily limit on a Redis Cluster, step 3 of 3: give back the place of a view that was
-- reserved (reserve_daily.lua) and then blocked by a rule of its content (record_views.lua).
-- Only a reservation still held is released, once: a second release of the same view, or a
-- release of a view never reserved, changes nothing, so a retried or replayed step is harmless.
-- KEYS: the viewers' day hashes, all of one viewer shard (one slot).
-- ARGV: per view: index of its hash in KEYS, view id.
-- Returns how many places were given back.
local released = 0
for a = 1, #ARGV, 2 do
  local key, id = KEYS[tonumber(ARGV[a])], ARGV[a + 1]
  if redis.call('HGET', key, id) == 'r' then
    redis.call('HSET', key, id, 'x')
    redis.call('HINCRBY', key, 'n', -1)
    released = released + 1
  end
end
return released
