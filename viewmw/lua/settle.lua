-- Settle committed views: for each content, syncing -> cached database count, then forget the item.
-- Only for the sync that owns the batch (lock token and fence): a sync whose lock expired after
-- its commit leaves the settling to the sync that took over.
-- Idempotent per item (an item is removed as it settles), so nothing ever settles twice.
-- The epoch moves first, so a cache fill that read the database before this cannot be stored.
-- KEYS: 1 batch hash, 2 this batch's items, 3 sync epoch, 4 sync lock
-- ARGV: 1 batch id, 2 key prefix, 3 lock token, 4 fence, then the members to settle
-- Returns {contents settled, items left} or {-1} if the caller does not own the batch.
if redis.call('GET', KEYS[4]) ~= ARGV[3] or redis.call('HGET', KEYS[1], 'id') ~= ARGV[1]
    or redis.call('HGET', KEYS[1], 'fence') ~= ARGV[4] then
  return {-1}
end
redis.call('INCR', KEYS[3])
local prefix = ARGV[2]
local settled = 0
for i = 5, #ARGV do
  local member = ARGV[i]
  local amount = tonumber(redis.call('HGET', KEYS[2], member))
  if amount then
    local sep = string.find(member, ':', 1, true)
    local content_type, content_id = string.sub(member, 1, sep - 1), string.sub(member, sep + 1)
    local syncing_key = prefix .. content_type .. ':syncing:' .. content_id
    local database_key = prefix .. content_type .. ':dbviews:' .. content_id
    if redis.call('DECRBY', syncing_key, amount) <= 0 then
      redis.call('DEL', syncing_key)
    end
    if redis.call('EXISTS', database_key) == 1 then
      redis.call('INCRBY', database_key, amount)
    end
    redis.call('HDEL', KEYS[2], member)
    settled = settled + 1
  end
end
local left = redis.call('HLEN', KEYS[2])
if left == 0 then
  redis.call('DEL', KEYS[1])
end
return {settled, left}
