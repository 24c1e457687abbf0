-- Settle committed views: for each item of the batch, syncing -> cached database count, then
-- forget the item. Only for the sync that owns the batch (lock token and fence): a sync whose
-- lock expired after its commit leaves the settling to the sync that took over.
-- The items are walked with HSCAN from the caller's cursor, up to ARGV[6] per call. Each item
-- is removed as it settles, so no later page returns it and nothing ever settles twice; when the
-- walk comes round to cursor 0 with items left, the caller starts it again.
-- The epoch moves first, so a cache fill that read the database before this cannot be stored.
-- The work is done a slice of keys per command (MGET, MSET, DEL, HDEL): the effect is exactly,
-- per item, DECRBY syncing (DEL when nothing is left), INCRBY the cached database count if there
-- is one (INCRBY keeps its TTL), HDEL item.
-- The item's per-day amounts leave the batch with it (HDEL from the batch's days), and its views
-- leave each day's ranking (ZINCRBY by minus the amount; ZREM at 0): from now on the history in
-- the database holds them.
-- KEYS: 1 batch hash, 2 this batch's items, 3 sync epoch, 4 sync lock, 5 this batch's days
-- ARGV: 1 batch id, 2 key prefix, 3 lock token, 4 fence, 5 HSCAN cursor ("0" to start),
--       6 most items to settle
-- Returns {items settled, items left, next cursor} or {-1} if the caller does not own the batch.
if redis.call('GET', KEYS[4]) ~= ARGV[3] or redis.call('HGET', KEYS[1], 'id') ~= ARGV[1]
    or redis.call('HGET', KEYS[1], 'fence') ~= ARGV[4] then
  return {-1}
end
redis.call('INCR', KEYS[3])
local SLICE = 1000
local prefix = ARGV[2]
local limit = tonumber(ARGV[6])

local page = redis.call('HSCAN', KEYS[2], ARGV[5], 'COUNT', limit)
local cursor, members, amounts, seen = page[1], {}, {}, {}
for i = 1, #page[2], 2 do
  local member = page[2][i]
  if not seen[member] then
    if #members == limit then
      -- HSCAN returned more than asked (a small hash comes whole): the rest is settled by the
      -- next call, which walks the same part of the hash again from the same cursor.
      cursor = ARGV[5]
      break
    end
    seen[member] = true
    members[#members + 1] = member
    amounts[#amounts + 1] = tonumber(page[2][i + 1])
  end
end

-- Settle members[first..last] (at most SLICE of them).
local function settle_slice(first, last)
  local syncing_keys, database_keys = {}, {}
  for n = first, last do
    -- A member is "{type}:{id}": its keys replace the first colon ("{type}:syncing:{id}").
    syncing_keys[#syncing_keys + 1] = prefix .. string.gsub(members[n], ':', ':syncing:', 1)
    database_keys[#database_keys + 1] = prefix .. string.gsub(members[n], ':', ':dbviews:', 1)
  end
  local syncing = redis.call('MGET', unpack(syncing_keys))
  local cached = redis.call('MGET', unpack(database_keys))
  local gone, left = {}, {}
  for i = 1, #syncing_keys do
    local amount = amounts[first + i - 1]
    local rest = (tonumber(syncing[i]) or 0) - amount
    if rest <= 0 then
      gone[#gone + 1] = syncing_keys[i]
    else
      left[#left + 1] = syncing_keys[i]
      left[#left + 1] = rest
    end
    if cached[i] then
      redis.call('INCRBY', database_keys[i], amount)
    end
  end
  if #gone > 0 then
    redis.call('DEL', unpack(gone))
  end
  if #left > 0 then
    redis.call('MSET', unpack(left))
  end
  local days = redis.call('HMGET', KEYS[5], unpack(members, first, last))
  for i = 1, #days do
    local member = members[first + i - 1]
    local colon = string.find(member, ':', 1, true)
    local ranking = prefix .. 'viewmw:top:' .. string.sub(member, 1, colon - 1) .. ':'
    local id = string.sub(member, colon + 1)
    for field, amount in string.gmatch(days[i] or '', '([^=,]+)=(%-?%d+)') do
      if amount ~= '0' and not string.find(field, ':', 1, true) then
        local key = ranking .. field
        if tonumber(redis.call('ZINCRBY', key, -tonumber(amount), id)) <= 0 then
          redis.call('ZREM', key, id)
        end
      end
    end
  end
  redis.call('HDEL', KEYS[5], unpack(members, first, last))
  redis.call('HDEL', KEYS[2], unpack(members, first, last))
end

for first = 1, #members, SLICE do
  settle_slice(first, math.min(first + SLICE - 1, #members))
end
local left = redis.call('HLEN', KEYS[2])
if left == 0 then
  redis.call('DEL', KEYS[1], KEYS[5])
end
return {#members, left, cursor}
