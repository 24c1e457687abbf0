-- Settle committed views: for each content, syncing -> cached database count, then forget the item.
-- Only for the sync that owns the batch (lock token and fence): a sync whose lock expired after
-- its commit leaves the settling to the sync that took over.
-- Idempotent per item (an item is removed as it settles), so nothing ever settles twice.
-- The epoch moves first, so a cache fill that read the database before this cannot be stored.
-- The work is done a slice of keys per command (HMGET, MGET, MSET, DEL, HDEL): the effect is
-- exactly, per content, HGET item, DECRBY syncing (DEL when nothing is left), INCRBY the cached
-- database count if there is one (INCRBY keeps its TTL), HDEL item.
-- KEYS: 1 batch hash, 2 this batch's items, 3 sync epoch, 4 sync lock
-- ARGV: 1 batch id, 2 key prefix, 3 lock token, 4 fence, then the members to settle
-- Returns {contents settled, items left} or {-1} if the caller does not own the batch.
if redis.call('GET', KEYS[4]) ~= ARGV[3] or redis.call('HGET', KEYS[1], 'id') ~= ARGV[1]
    or redis.call('HGET', KEYS[1], 'fence') ~= ARGV[4] then
  return {-1}
end
redis.call('INCR', KEYS[3])
local SLICE = 1000
local prefix = ARGV[2]

-- Settle members[first..last] (at most SLICE of them).
local function settle_slice(members, first, last)
  local recorded = redis.call('HMGET', KEYS[2], unpack(members, first, last))
  local settled, amounts, syncing_keys, database_keys = {}, {}, {}, {}
  for i = 1, #recorded do
    local amount = tonumber(recorded[i])
    if amount then
      local member = members[first + i - 1]
      local n = #settled + 1
      settled[n], amounts[n] = member, amount
      -- A member is "{type}:{id}": its keys replace the first colon ("{type}:syncing:{id}").
      syncing_keys[n] = prefix .. string.gsub(member, ':', ':syncing:', 1)
      database_keys[n] = prefix .. string.gsub(member, ':', ':dbviews:', 1)
    end
  end
  if #settled == 0 then
    return 0
  end
  local syncing = redis.call('MGET', unpack(syncing_keys))
  local cached = redis.call('MGET', unpack(database_keys))
  local gone, left = {}, {}
  for n = 1, #settled do
    local rest = (tonumber(syncing[n]) or 0) - amounts[n]
    if rest <= 0 then
      gone[#gone + 1] = syncing_keys[n]
    else
      left[#left + 1] = syncing_keys[n]
      left[#left + 1] = rest
    end
    if cached[n] then
      redis.call('INCRBY', database_keys[n], amounts[n])
    end
  end
  if #gone > 0 then
    redis.call('DEL', unpack(gone))
  end
  if #left > 0 then
    redis.call('MSET', unpack(left))
  end
  redis.call('HDEL', KEYS[2], unpack(settled))
  return #settled
end

-- A member named twice settles once: a slice reads every item before it forgets any.
local members, seen = {}, {}
for i = 5, #ARGV do
  if not seen[ARGV[i]] then
    seen[ARGV[i]] = true
    members[#members + 1] = ARGV[i]
  end
end
local settled = 0
for first = 1, #members, SLICE do
  settled = settled + settle_slice(members, first, math.min(first + SLICE - 1, #members))
end
local left = redis.call('HLEN', KEYS[2])
if left == 0 then
  redis.call('DEL', KEYS[1])
end
return {settled, left}
