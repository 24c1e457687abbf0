-- Read the sealed batch's items, a page at a time, only for the sync that owns it.
-- The ownership check and the read are one atomic step: a sync whose lock expired can never read
-- a batch that another sync has since taken over (or dropped and replaced).
-- KEYS: 1 sync lock, 2 batch hash, 3 this batch's items, 4 this batch's days.
-- ARGV: 1 lock token, 2 batch id, 3 fence, 4 HSCAN cursor, 5 page size.
-- Returns {next cursor, member, amount, days, member, amount, days, ...} or {-1}; days is the
-- member's encoded per-day amounts ("" when it has none).
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('HGET', KEYS[2], 'id') ~= ARGV[2]
    or redis.call('HGET', KEYS[2], 'fence') ~= ARGV[3] or not redis.call('HGET', KEYS[2], 'sealed') then
  return {-1}
end
local page = redis.call('HSCAN', KEYS[3], ARGV[4], 'COUNT', ARGV[5])
local out = {page[1]}
for i = 1, #page[2], 2 do
  out[#out + 1] = page[2][i]
  out[#out + 1] = page[2][i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[4], page[2][i]) or ''
end
return out
