-- Copy one viewer's sessions into the Redis being moved to: each content's field, unless the hash
-- there has that content already (views counted there since the move stand; nothing is ever
-- replaced). The hash then lives at least as long as the copied one had left.
-- KEYS: 1 the viewer's session hash there.  ARGV: 1 TTL (ms), then field, value pairs.
-- Returns how many fields were copied.
local copied = 0
for i = 2, #ARGV, 2 do
  copied = copied + redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
end
if copied > 0 and redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return copied
