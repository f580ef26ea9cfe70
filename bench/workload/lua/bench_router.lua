-- Route matching over a table of APISIX-like routes: host, method set, URI prefix, vars.
local _M = {}

local lower, sub, find, format = string.lower, string.sub, string.find, string.format

local routes = {}
local verbs = { "GET", "POST", "PUT", "DELETE", "PATCH" }
for i = 1, 300 do
    local methods = { GET = true }
    methods[verbs[i % #verbs + 1]] = true
    routes[i] = {
        id = format("route-%04d", i),
        priority = i % 3,
        host = (i % 10 == 0) and format("api%d.example.com", i % 7) or nil,
        methods = methods,
        prefix = format("/api/v%d/svc%d/", i % 4, i),
        upstream = { nodes = { [format("10.0.%d.%d:80", math.floor(i / 256), i % 256)] = 1 }, type = "roundrobin", id = "up-" .. i },
        plugins = { "key-auth", "limit-count", "proxy-rewrite", "request-id", "response-rewrite" },
    }
end
_M.routes = routes

local function host_ok(r, host)
    return r.host == nil or r.host == host or (sub(r.host, 1, 1) == "*" and find(host, sub(r.host, 2), 1, true) ~= nil)
end

function _M.match(method, host, uri)
    local path = lower(uri)
    local q = find(path, "?", 1, true)
    if q then
        path = sub(path, 1, q - 1)
    end
    local best
    for i = 1, #routes do
        local r = routes[i]
        if sub(path, 1, #r.prefix) == r.prefix and r.methods[method] and host_ok(r, host) then
            if not best or r.priority > best.priority then
                best = r
            end
        end
    end
    return best
end

return _M
