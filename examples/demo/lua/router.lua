-- A small APISIX-like router: match a URI against prefix routes, then run plugins.
local util = require "util"

local _M = {}

local routes = {}
for i = 1, 200 do
    routes[i] = { prefix = "/api/v" .. (i % 7) .. "/svc" .. i, id = i }
end

function _M.match(uri)
    for i = 1, #routes do
        local r = routes[i]
        if uri:sub(1, #r.prefix) == r.prefix then
            return r
        end
    end
    return nil
end

function _M.access(uri)
    local route = _M.match(uri) or { id = 0 }
    local sum = util.crc(uri .. route.id)
    local parts = util.split("a,b,c,d,e,f,g,h," .. uri, ",")
    return sum + #parts
end

return _M
