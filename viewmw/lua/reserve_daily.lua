-- The daily limit on a Redis Cluster, step 1 of 3: reserve each view's place in its viewer's
-- quota for the day (docs/keys.md, "The daily limit: the one rule across slots"). Step 2 is
-- record_views.lua on the content's shard, given this call's answer; step 3 is release_daily.lua
-- for a reserved view that a content rule then blocked.
-- A viewer's day is a hash in the viewer's shard: n = views reserved and not released, and one
-- field per view id, "r" (reserved) or "x" (released). A view id already there gets its earlier
-- answer back and reserves nothing more, so a replayed view (same id) is decided exactly once.
-- A reservation stands until it is released: a lost step can only leave n too high (the viewer
-- may count one view fewer that day), never let a viewer past the limit.
-- KEYS: the viewers' day hashes, all of one viewer shard (one slot).
-- ARGV: 1 daily limit, then per view: index of its hash in KEYS, view id, the hash's TTL (s).
-- Returns per view: 1 reserved, 0 full (no place left: the view is blocked by the daily limit
-- unless an earlier rule blocks it), -1 reserved once and released since.
local limit = tonumber(ARGV[1])
local out = {}
for a = 2, #ARGV, 3 do
  local key, id = KEYS[tonumber(ARGV[a])], ARGV[a + 1]
  local state = redis.call('HGET', key, id)
  if state == 'r' then
    out[#out + 1] = 1
  elseif state == 'x' then
    out[#out + 1] = -1
  elseif (tonumber(redis.call('HGET', key, 'n')) or 0) < limit then
    redis.call('HINCRBY', key, 'n', 1)
    redis.call('HSET', key, id, 'r')
    redis.call('EXPIRE', key, ARGV[a + 2], 'NX') -- once: every view of the day ends it alike
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
