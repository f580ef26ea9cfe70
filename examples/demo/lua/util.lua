local bit = require "bit"

local _M = {}

function _M.crc(s)
    local h = 0
    for _ = 1, 3000 do
        for i = 1, #s do
            h = bit.band(bit.bxor(h * 31, s:byte(i)), 0xffffff)
        end
    end
    return h
end

function _M.split(s, sep)
    local out = {}
    for part in s:gmatch("[^" .. sep .. "]+") do
        out[#out + 1] = part
    end
    return out
end

return _M
