-- Settle committed views: for each item of the batch, syncing -> cached database count, then
-- forget the item. Only for the sync that owns the batch (lock token and fence): a sync whose
-- lock expired after its commit leaves the settling to the sync that took over.
-- The items are walked with HSCAN from the caller's cursor, up to ARGV[5] per call. Each item
-- is removed as it settles, so no later page returns it and nothing ever settles twice; when the
-- walk comes round to cursor 0 with items left, the caller starts it again.
-- The epoch moves first, so a cache fill that read the database before this cannot be stored.
-- The work is done a slice of keys per command (MGET, MSET, DEL, HDEL): the effect is exactly,
-- per item, DECRBY syncing (DEL when nothing is left), INCRBY the cached database count if there
-- is one (INCRBY keeps its TTL), HDEL item.
-- The item's per-day amounts leave the batch with it (HDEL from the batch's days: a ranking's
-- reader takes a committed batch's days off the ranking, so both go in the same step), and its
-- views leave each day's ranking: from now on the history in the database holds them. The effect
-- is ZINCRBY by minus the amount, then ZREM at 0 or below, per item and day; it is done a ranking
-- at a time per slice (ZMSCORE, then one ZADD and one ZREM), and a content missing from the
-- ranking (expired with it, or the whole ranking) is left out.
-- A content's keys are named by the caller's templates (viewmw.keys.KeySchema), filled with
-- string.format(template, type, id) or (type, day): no key layout is written here.
-- KEYS: 1 batch hash, 2 this batch's items, 3 sync epoch, 4 sync lock (on a cluster: the shard's fence floor), 5 this batch's days
-- ARGV: 1 batch id, 2 lock token, 3 fence, 4 HSCAN cursor ("0" to start), 5 most items to
--       settle, 6 syncing template, 7 database count template, 8 ranking template
-- Returns {items settled, items left, next cursor} or {-1} if the caller does not own the batch.
-- include: holds_sync
if not holds_sync(KEYS[4], ARGV[2], ARGV[3]) or redis.call('HGET', KEYS[1], 'id') ~= ARGV[1]
    or redis.call('HGET', KEYS[1], 'fence') ~= ARGV[3] then
  return {-1}
end
redis.call('INCR', KEYS[3])
-- Keys per command: each argument and each value of a reply costs an allocation, and a
-- hundred keys a command keep those small (measured: about a tenth less Redis CPU than 1000).
local SLICE = 100
local limit = tonumber(ARGV[5])
-- include: key_maker
local syncing_key, database_key = key_maker(ARGV[6]), key_maker(ARGV[7])
local ranking_key = key_maker(ARGV[8])

local page = redis.call('HSCAN', KEYS[2], ARGV[4], 'COUNT', limit)
local cursor, members, amounts, seen = page[1], {}, {}, {}
for i = 1, #page[2], 2 do
  local member = page[2][i]
  if not seen[member] then
    if #members == limit then
      -- HSCAN returned more than asked (a small hash comes whole): the rest is settled by the
      -- next call, which walks the same part of the hash again from the same cursor.
      cursor = ARGV[4]
      break
    end
    seen[member] = true
    members[#members + 1] = member
    amounts[#members] = tonumber(page[2][i + 1])
  end
end

-- A member is "{type}:{id}": the type ends at the first colon.
local types, ids = {}, {}
for n, member in ipairs(members) do
  local colon = string.find(member, ':', 1, true)
  types[n], ids[n] = string.sub(member, 1, colon - 1), string.sub(member, colon + 1)
end

-- Take the views of members[first..last] off each day's ranking.
local function unrank(first, last)
  local days = redis.call('HMGET', KEYS[5], unpack(members, first, last))
  local by_ranking, rankings = {}, {}
  local function add(n, field, amount)
    if amount == '0' or string.find(field, ':', 1, true) then
      return -- no views, or a crawler field: no ranking holds them
    end
    local key = ranking_key(types[n], field)
    local group = by_ranking[key]
    if not group then
      group = {ids = {}, amounts = {}, index = {}}
      by_ranking[key] = group
      rankings[#rankings + 1] = key
    end
    -- A field may appear more than once in the encoding: the amounts add up.
    local at = group.index[ids[n]]
    if at then
      group.amounts[at] = group.amounts[at] + tonumber(amount)
    else
      at = #group.ids + 1
      group.ids[at], group.amounts[at], group.index[ids[n]] = ids[n], tonumber(amount), at
    end
  end
  for i = 1, #days do
    local encoded = days[i]
    if encoded then
      local equals = string.find(encoded, '=', 1, true)
      if equals and not string.find(encoded, ',', 1, true) then
        -- The common case, one field ("2026-11-30=4"): no pattern matching.
        add(first + i - 1, string.sub(encoded, 1, equals - 1), string.sub(encoded, equals + 1))
      else
        for field, amount in string.gmatch(encoded, '([^=,]+)=(%-?%d+)') do
          add(first + i - 1, field, amount)
        end
      end
    end
  end
  for _, key in ipairs(rankings) do
    local group = by_ranking[key]
    -- A ranking that is gone (expired) answers nil for each: nothing is changed.
    local scores = redis.call('ZMSCORE', key, unpack(group.ids))
    local kept, gone = {}, {}
    for i = 1, #group.ids do
      if scores[i] then
        local rest = tonumber(scores[i]) - group.amounts[i]
        if rest <= 0 then
          gone[#gone + 1] = group.ids[i]
        else
          kept[#kept + 1] = rest
          kept[#kept + 1] = group.ids[i]
        end
      end
    end
    if #kept > 0 then
      redis.call('ZADD', key, 'XX', unpack(kept))
    end
    if #gone > 0 then
      redis.call('ZREM', key, unpack(gone))
    end
  end
end

-- Settle members[first..last] (at most SLICE of them).
local function settle_slice(first, last)
  local syncing_keys, database_keys = {}, {}
  for n = first, last do
    syncing_keys[#syncing_keys + 1] = syncing_key(types[n], ids[n])
    database_keys[#database_keys + 1] = database_key(types[n], ids[n])
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
  unrank(first, last)
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
