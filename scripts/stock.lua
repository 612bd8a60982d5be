local stock = tonumber(redis.call('GET', KEYS[1]))
if stock == nil then return -1 end
local qty = tonumber(ARGV[3])
local limit = tonumber(ARGV[2])
if limit > 0 then
  local bought = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
  if bought + qty > limit then return -2 end
end
if stock < qty then return 0 end
redis.call('DECRBY', KEYS[1], qty)
if limit > 0 then redis.call('HINCRBY', KEYS[2], ARGV[1], qty) end
return 1
