-- Read the sealed batch's items, a page at a time, only for the sync that owns it.
-- The ownership check and the read are one atomic step: a sync whose lock expired can never read
-- a batch that another sync has since taken over (or dropped and replaced).
-- KEYS: 1 sync lock (on a cluster: the shard's fence floor, see holds_sync), 2 batch hash, 3 this batch's items, 4 this batch's days.
-- ARGV: 1 lock token, 2 batch id, 3 fence, 4 HSCAN cursor, 5 page size.
-- Returns {next cursor, member, amount, days, member, amount, days, ...} or {-1}; days is the
-- member's encoded per-day amounts ("" when it has none).
-- include: holds_sync
if not holds_sync(KEYS[1], ARGV[1], ARGV[3]) or redis.call('HGET', KEYS[2], 'id') ~= ARGV[2]
    or redis.call('HGET', KEYS[2], 'fence') ~= ARGV[3] or not redis.call('HGET', KEYS[2], 'sealed') then
  return {-1}
end
local page = redis.call('HSCAN', KEYS[3], ARGV[4], 'COUNT', ARGV[5])
local flat = page[2]
local out = {page[1]}
if #flat == 0 then
  return out
end
-- The days of the whole page in one command per slice of members: small slices keep each
-- command's arguments and reply small (measured: less Redis CPU than 1000 per command).
local SLICE = 100
local members = {}
for i = 1, #flat, 2 do
  members[#members + 1] = flat[i]
end
for start = 1, #members, SLICE do
  local last = math.min(start + SLICE - 1, #members)
  local days = redis.call('HMGET', KEYS[4], unpack(members, start, last))
  for n = start, last do
    out[#out + 1] = members[n]
    out[#out + 1] = flat[2 * n]
    out[#out + 1] = days[n - start + 1] or ''
  end
end
return out
