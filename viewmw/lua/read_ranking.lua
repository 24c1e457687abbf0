-- Read the real-time part of a ranking: views not yet settled into the history, per content id
-- of one type, over some days (one sorted set per day), with the sync epoch and the unsettled
-- batch's id. Either the n ids with the most such views, or the views of given ids, with each
-- id's part of the unsettled batch (which the database holds once the batch is committed).
-- KEYS: 1 sync epoch, 2 sync batch hash, then one ranking per day.
-- ARGV: 1 the batch's days hash key as a string.format template of the batch id, 2 content type,
--       3 n (0: read the given ids instead), then ids.
-- Returns {epoch, batch id or "", then per id: id, views, batch's days of the id or ""}.
local epoch = tonumber(redis.call('GET', KEYS[1])) or 0
local batch_id = redis.call('HGET', KEYS[2], 'id') or ''
local out = {epoch, batch_id}
local rankings = {}
for i = 3, #KEYS do
  rankings[#rankings + 1] = KEYS[i]
end
local batch_days = string.format(ARGV[1], batch_id)
local function add(id, views)
  out[#out + 1] = id
  out[#out + 1] = views
  if batch_id ~= '' then
    out[#out + 1] = redis.call('HGET', batch_days, ARGV[2] .. ':' .. id) or ''
  else
    out[#out + 1] = ''
  end
end
local n = tonumber(ARGV[3])
if n > 0 then
  if #rankings == 1 then
    local top = redis.call('ZREVRANGE', rankings[1], 0, n - 1, 'WITHSCORES')
    for i = 1, #top, 2 do
      add(top[i], top[i + 1])
    end
  elseif #rankings > 1 then
    -- Ascending by views: the n last are the n most viewed.
    local command = {'ZUNION', #rankings}
    for _, ranking in ipairs(rankings) do
      command[#command + 1] = ranking
    end
    command[#command + 1] = 'WITHSCORES'
    local all = redis.call(unpack(command))
    local last = #all - 1
    local first = math.max(1, #all - 2 * n + 1)
    for i = last, first, -2 do
      add(all[i], all[i + 1])
    end
  end
else
  for i = 4, #ARGV do
    local views = 0
    for _, ranking in ipairs(rankings) do
      views = views + (tonumber(redis.call('ZSCORE', ranking, ARGV[i])) or 0)
    end
    add(ARGV[i], views)
  end
end
return out
