-- Move up to ARGV[4] contents from pending into the unsettled batch, atomically.
-- Found through the run's share of the dirty set, so a snapshot costs O(pending), not
-- O(keyspace).
-- Refuses (returns -1) unless the caller still holds the sync lock, the batch is its own (its id
-- and its owner's fence) and it is not yet sealed for commit: a sync whose lock expired can never
-- add to a batch another sync has taken over.
-- Contents of a refused type (its views would go elsewhere than the app reads them) stay
-- pending and go back to the dirty set for a later sync.
-- KEYS: 1 sync lock, 2 batch hash, 3 this batch's items, 4 the run's contents (taken from the
--       dirty set when the run began), 5 sync epoch, 6 dirty set
-- ARGV: 1 lock token, 2 batch id, 3 key prefix, 4 chunk size, 5 fence, then refused types
-- Returns {contents moved, views moved, run's contents left} or {-1}
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('HGET', KEYS[2], 'id') ~= ARGV[2]
    or redis.call('HGET', KEYS[2], 'fence') ~= ARGV[5] or redis.call('HGET', KEYS[2], 'sealed') then
  return {-1}
end
local refused = {}
for i = 6, #ARGV do
  refused[ARGV[i]] = true
end
local prefix = ARGV[3]
local members = redis.call('SPOP', KEYS[4], tonumber(ARGV[4]))
local contents, views = 0, 0
for _, member in ipairs(members) do
  local sep = string.find(member, ':', 1, true)
  local content_type, content_id = string.sub(member, 1, sep - 1), string.sub(member, sep + 1)
  local pending_key = prefix .. content_type .. ':views:' .. content_id
  local amount = tonumber(redis.call('GET', pending_key)) or 0
  if refused[content_type] then
    if amount > 0 then
      redis.call('SADD', KEYS[6], member)
    end
  elseif amount > 0 then
    redis.call('DEL', pending_key)
    redis.call('INCRBY', prefix .. content_type .. ':syncing:' .. content_id, amount)
    redis.call('HINCRBY', KEYS[3], member, amount)
    contents = contents + 1
    views = views + amount
  end
end
if contents > 0 then
  redis.call('INCR', KEYS[5])
end
return {contents, views, redis.call('SCARD', KEYS[4])}
