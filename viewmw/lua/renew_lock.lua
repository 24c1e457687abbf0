-- Extend the sync lock, only for its owner. KEYS: 1 lock. ARGV: 1 token, 2 ttl (ms). Returns 1 or 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
