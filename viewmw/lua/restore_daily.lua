-- Copy one viewer's daily counter into the Redis being moved to, unless it has one already
-- (views counted there since the move stand; nothing is ever replaced).
-- KEYS: 1 the daily counter's name there.  ARGV: 1 views counted, 2 TTL (ms),
-- 3 "hash" on a Redis Cluster (the quota hash: field n) or "" on a single Redis (a string).
-- Returns 1 if copied, 0 if the key was there.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
if ARGV[3] == 'hash' then
  redis.call('HSET', KEYS[1], 'n', ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
