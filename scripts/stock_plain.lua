-- The seed's plain stock script (issue #8's baseline): GET, check, DECR on one key.
-- Returns 1 deducted, 0 not enough stock, -1 no such key. Called as EVALSHA <sha> 1 <stock key>.
local stock = tonumber(redis.call('GET', KEYS[1]))
if stock == nil then return -1 end
if stock < 1 then return 0 end
redis.call('DECR', KEYS[1])
return 1
