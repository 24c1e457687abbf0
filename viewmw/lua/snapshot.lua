-- Move up to ARGV[3] contents from pending into the unsettled batch, atomically.
-- Found through the run's share of the dirty set, so a snapshot costs O(pending), not
-- O(keyspace): the set is walked with SSCAN from the caller's cursor and each member taken is
-- removed from it (SREM), which costs far less than SPOP's random picks in a large set. A
-- member taken is gone from the set, so no later page returns it again; a page that returned
-- one twice (SSCAN allows it) takes it once. When the walk comes round to cursor 0 with members
-- left (SSCAN only promises the members present all along), the caller starts it again.
-- Refuses (returns -1) unless the caller still holds the sync lock, the batch is its own (its id
-- and its owner's fence) and it is not yet sealed for commit: a sync whose lock expired can never
-- add to a batch another sync has taken over.
-- Contents of a refused type (its views would go elsewhere than the app reads them) stay
-- pending and go back to the dirty set for a later sync.
-- The work is done a slice of keys per command (MGET, DEL, MSETNX, HMGET, HSET) rather than a
-- few commands per content: the script is atomic either way, and each command and each value
-- crossing between Lua and Redis costs far more than the arithmetic between them. The effect is
-- exactly GET, DEL, INCRBY and HINCRBY per content.
-- Each content's days hash (pending views per calendar day, crawler views per day) moves with its
-- pending counter, in the same call, into this batch's days hash (member -> "field=amount,..."),
-- so per-day amounts are conserved exactly as the totals are. Pending views without a day (kept
-- by a version before the history) are given the fallback day. A content with nothing pending
-- but a days hash (crawler views, or viewers that were all blocked) is moved with an amount of 0.
-- A content's keys are named by the caller's templates (viewmw.keys.KeySchema), filled with
-- string.format(template, type, id): no key layout is written here.
-- KEYS: 1 sync lock (on a cluster: the shard's fence floor, see holds_sync), 2 batch hash, 3 this batch's items, 4 the run's contents (taken from the
--       dirty set when the run began), 5 sync epoch, 6 dirty set, 7 this batch's days
-- ARGV: 1 lock token, 2 batch id, 3 chunk size (most contents taken), 4 fence,
--       5 SSCAN cursor ("0" to start), 6 fallback day (YYYY-MM-DD), 7 pending template,
--       8 syncing template, 9 days template, then refused types
-- Returns {contents moved, views moved, run's contents left, next cursor, contents taken from
-- the run's set} or {-1}
-- include: holds_sync
if not holds_sync(KEYS[1], ARGV[1], ARGV[4]) or redis.call('HGET', KEYS[2], 'id') ~= ARGV[2]
    or redis.call('HGET', KEYS[2], 'fence') ~= ARGV[4] or redis.call('HGET', KEYS[2], 'sealed') then
  return {-1}
end
-- Keys per command: each argument and each value of a reply costs an allocation, and a
-- hundred keys a command keep those small (measured: about a tenth less Redis CPU than 1000).
local SLICE = 100

-- The values of keys[first..last] as numbers (0 when missing), one command per slice; and
-- whether any was there.
local function read_all(command, first_arg, keys)
  local values, any = {}, false
  for start = 1, #keys, SLICE do
    local last = math.min(start + SLICE - 1, #keys)
    local reply
    if first_arg then
      reply = redis.call(command, first_arg, unpack(keys, start, last))
    else
      reply = redis.call(command, unpack(keys, start, last))
    end
    for i = 1, #reply do
      values[start + i - 1] = tonumber(reply[i]) or 0
      any = any or reply[i] ~= false
    end
  end
  return values, any
end

-- HSET of a flat list of field/value pairs, one command per slice.
local function hset_pairs(key, flat)
  for start = 1, #flat, 2 * SLICE do
    redis.call('HSET', key, unpack(flat, start, math.min(start + 2 * SLICE - 1, #flat)))
  end
end

local refused = {}
for i = 10, #ARGV do
  refused[ARGV[i]] = true
end
local limit = tonumber(ARGV[3])
-- include: key_maker
local pending_key, syncing_key = key_maker(ARGV[7]), key_maker(ARGV[8])
local days_key = key_maker(ARGV[9])
local page = redis.call('SSCAN', KEYS[4], ARGV[5], 'COUNT', limit)
local cursor, members, seen = page[1], {}, {}
for _, member in ipairs(page[2]) do
  if not seen[member] then
    if #members == limit then
      -- SSCAN returned more than asked (a small set comes whole): the rest is taken by the next
      -- call, which walks the same part of the set again from the same cursor.
      cursor = ARGV[5]
      break
    end
    seen[member] = true
    members[#members + 1] = member
  end
end
for start = 1, #members, SLICE do
  redis.call('SREM', KEYS[4], unpack(members, start, math.min(start + SLICE - 1, #members)))
end
-- A member is "{type}:{id}" (a type has no colon; an id may not either, but the type ends at
-- the first one).
local types, ids = {}, {}
local pending_keys = {}
for n, member in ipairs(members) do
  local colon = string.find(member, ':', 1, true)
  types[n], ids[n] = string.sub(member, 1, colon - 1), string.sub(member, colon + 1)
  pending_keys[n] = pending_key(types[n], ids[n])
end
local amounts = read_all('MGET', nil, pending_keys)

local function has_days(i)
  return redis.call('EXISTS', days_key(types[i], ids[i])) == 1
end

local any_refused = next(refused) ~= nil
local moved, moved_pending, syncing_keys = {}, {}, {}
local contents, views = 0, 0
for i = 1, #members do
  local amount = amounts[i]
  if any_refused and refused[types[i]] then
    if amount > 0 or has_days(i) then
      redis.call('SADD', KEYS[6], members[i])
    end
  elseif amount > 0 or has_days(i) then
    contents = contents + 1
    views = views + amount
    moved[contents] = i
    moved_pending[contents] = pending_keys[i]
    syncing_keys[contents] = syncing_key(types[i], ids[i])
  end
end
if contents == 0 then
  return {0, 0, redis.call('SCARD', KEYS[4]), cursor, #members}
end

for start = 1, contents, SLICE do
  redis.call('DEL', unpack(moved_pending, start, math.min(start + SLICE - 1, contents)))
end
local moved_members = {}
for n = 1, contents do
  moved_members[n] = members[moved[n]]
end
-- Syncing is normally empty for every content taken (the batch before settled it all): one
-- MSETNX per slice then sets them all; a slice where any exists is added up value by value.
-- A content moved with an amount of 0 gets no syncing counter.
for start = 1, contents, SLICE do
  local last = math.min(start + SLICE - 1, contents)
  local new_syncing, counted_keys = {}, {}
  for n = start, last do
    if amounts[moved[n]] > 0 then
      new_syncing[#new_syncing + 1] = syncing_keys[n]
      new_syncing[#new_syncing + 1] = amounts[moved[n]]
      counted_keys[#counted_keys + 1] = syncing_keys[n]
    end
  end
  if #new_syncing > 0 and redis.call('MSETNX', unpack(new_syncing)) == 0 then
    local syncing = redis.call('MGET', unpack(counted_keys))
    for i = 1, #syncing do
      new_syncing[2 * i] = new_syncing[2 * i] + (tonumber(syncing[i]) or 0)
    end
    redis.call('MSET', unpack(new_syncing))
  end
end
local recorded, items_before = read_all('HMGET', KEYS[3], moved_members)
local new_items = {}
for n = 1, contents do
  new_items[2 * n - 1], new_items[2 * n] = moved_members[n], recorded[n] + amounts[moved[n]]
end
hset_pairs(KEYS[3], new_items)

-- The per-day amounts: each days hash is appended to what the batch holds for its content
-- (nothing, unless a retried snapshot took it before), then deleted. A field may appear more
-- than once in the encoding: every reader adds its amounts up.
local fallback_day = ARGV[6]
local days_keys, batch_days = {}, {}
for n = 1, contents do
  days_keys[n] = days_key(types[moved[n]], ids[moved[n]])
end
for start = 1, contents, SLICE do
  local last = math.min(start + SLICE - 1, contents)
  -- The batch holds days only for contents that were its items before this call: normally none.
  local held = items_before and redis.call('HMGET', KEYS[7], unpack(moved_members, start, last))
      or {}
  for n = start, last do
    local flat = redis.call('HGETALL', days_keys[n])
    local amount, before = amounts[moved[n]], held[n - start + 1]
    local text
    if #flat == 2 and #flat[1] == 10 and tonumber(flat[2]) == amount and not before then
      -- The common case: one day holds all the views (no table to build).
      text = flat[1] .. '=' .. flat[2]
    else
      local encoded, dated = {}, 0
      for i = 1, #flat, 2 do
        encoded[#encoded + 1] = flat[i] .. '=' .. flat[i + 1]
        if #flat[i] == 10 then -- a day's views (YYYY-MM-DD); crawler fields are longer
          dated = dated + tonumber(flat[i + 1])
        end
      end
      local undated = amount - dated
      if undated > 0 then
        encoded[#encoded + 1] = fallback_day .. '=' .. undated
      end
      if before then
        table.insert(encoded, 1, before)
      end
      text = table.concat(encoded, ',')
    end
    batch_days[#batch_days + 1] = moved_members[n]
    batch_days[#batch_days + 1] = text
  end
  redis.call('DEL', unpack(days_keys, start, last))
end
hset_pairs(KEYS[7], batch_days)
redis.call('INCR', KEYS[5])
return {contents, views, redis.call('SCARD', KEYS[4]), cursor, #members}
