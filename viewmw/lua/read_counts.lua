-- Read the counts of many contents in one round trip.
-- KEYS: 1 sync epoch, 2 sync batch hash, then per content: pending, syncing, cached database count
-- Returns {epoch, batch id or "", then per content: pending, syncing, cached count or -1}
local out = {tonumber(redis.call('GET', KEYS[1])) or 0, redis.call('HGET', KEYS[2], 'id') or ''}
for i = 3, #KEYS, 3 do
  out[#out + 1] = tonumber(redis.call('GET', KEYS[i])) or 0
  out[#out + 1] = tonumber(redis.call('GET', KEYS[i + 1])) or 0
  out[#out + 1] = tonumber(redis.call('GET', KEYS[i + 2])) or -1
end
return out
