-- /deep: recurses 100 Lua frames deep (or ?depth=N), then burns CPU at the bottom.
local _M = {}

local function burn(n)
    local h = 0
    for i = 1, n do
        h = (h * 31 + i) % 1000003
    end
    return h
end

local function descend(depth, n)
    if depth <= 1 then
        return burn(n)
    end
    local r = descend(depth - 1, n) -- not a tail call: every level keeps its frame
    return r + 1
end

function _M.run()
    local depth = tonumber(ngx.var.arg_depth) or 100
    ngx.say(descend(depth, 200000))
end

return _M
