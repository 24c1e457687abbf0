-- Read what Redis holds of many contents' per-day views, in one atomic step: each content's days
-- hash (pending views per day) and its part of the unsettled sync batch, with the sync epoch and
-- the batch id, so the caller can tell whether the database already holds that part; and, when
-- asked, whether each content's merged kept sketch of this epoch exists (a period read's
-- unique viewers: see viewer_estimates.py).
-- KEYS: 1 sync epoch, 2 sync batch hash, then per content: its days hash.
-- ARGV: 1 the batch's days hash key as a string.format template of the batch id,
--       2 "1" when per-content merged-sketch names follow the members, else "0",
--       then per content: its member ("{type}:{id}"),
--       then (with ARGV[2] "1") per content: its merged sketch's key as a string.format
--       template of the epoch.
-- Returns {epoch, batch id or "", then per content: days hash as "field=amount,...",
--          the batch's days of the content ("" when none); then (with ARGV[2] "1") per content:
--          1 when its merged sketch exists, else 0}.
local epoch = tonumber(redis.call('GET', KEYS[1])) or 0
local batch_id = redis.call('HGET', KEYS[2], 'id') or ''
local out = {epoch, batch_id}
local batch_days = string.format(ARGV[1], batch_id)
local contents = #KEYS - 2
for i = 3, #KEYS do
  local flat = redis.call('HGETALL', KEYS[i])
  local encoded = {}
  for j = 1, #flat, 2 do
    encoded[#encoded + 1] = flat[j] .. '=' .. flat[j + 1]
  end
  out[#out + 1] = table.concat(encoded, ',')
  if batch_id ~= '' then
    out[#out + 1] = redis.call('HGET', batch_days, ARGV[i]) or ''
  else
    out[#out + 1] = ''
  end
end
if ARGV[2] == '1' then
  for i = 1, contents do
    -- Not among KEYS: while its slot moves, a cluster node may refuse a key it does not hold.
    -- Taken as missing, the sketch is then made by count_viewers, which names it.
    local found = redis.pcall('EXISTS', string.format(ARGV[2 + contents + i], epoch))
    out[#out + 1] = type(found) == 'number' and found or 0
  end
end
return out
