-- Read the day's HyperLogLogs of many contents for the sync: each one's estimate and the
-- HyperLogLog itself (its serialized form, for the history to merge days later).
-- A Redis stand-in that keeps HyperLogLogs as a type of its own refuses the GET: the estimate is
-- then returned without its sketch.
-- KEYS: the HyperLogLogs.
-- Returns, per key: estimate (0 when the key does not exist), sketch or "".
local out = {}
for i = 1, #KEYS do
  local estimate = redis.call('PFCOUNT', KEYS[i])
  local sketch = ''
  if estimate > 0 then
    local ok, value = pcall(redis.call, 'GET', KEYS[i])
    if ok and value then
      sketch = value
    end
  end
  out[#out + 1] = estimate
  out[#out + 1] = sketch
end
return out
