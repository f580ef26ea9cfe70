-- A plugin chain: each plugin does the kind of work APISIX plugins do per request.
local _M = {}

local format, find, sub, byte = string.format, string.find, string.sub, string.byte
local concat = table.concat

local counters = {}
local ncounters = 0

local consumers = {}
for i = 1, 64 do
    consumers["key-" .. i] = { username = "user" .. i, plan = (i % 3 == 0) and "gold" or "free" }
end

local function key_auth(ctx)
    local key = ctx.headers["apikey"] or ""
    if find(key, "^key%-%d+$") == nil then
        ctx.consumer = { username = "anonymous", plan = "free" }
        return
    end
    ctx.consumer = consumers[key] or { username = "unknown", plan = "free" }
end

local function limit_count(ctx)
    local k = format("%s:%s:%s:%d", ctx.route.id, ctx.consumer.username, ctx.remote, ctx.window)
    local c = counters[k]
    if c == nil then
        ncounters = ncounters + 1
        if ncounters > 10000 then
            counters, ncounters = {}, 1
        end
        c = { count = 0, reset = ctx.window + 60 }
        counters[k] = c
    end
    c.count = c.count + 1
    ctx.resp_headers["X-RateLimit-Limit"] = ctx.consumer.plan == "gold" and 10000 or 1000
    ctx.resp_headers["X-RateLimit-Remaining"] = 1000000 - c.count
end

local function proxy_rewrite(ctx)
    local new_uri, n = ngx.re.sub(ctx.uri, [[^/api/v\d+/(svc\d+)/]], "/$1/internal/", "jo")
    ctx.upstream_uri = n > 0 and new_uri or ctx.uri
    local parts = {}
    for seg in ctx.upstream_uri:gmatch("[^/]+") do
        parts[#parts + 1] = seg
    end
    ctx.segments = parts
end

local function request_id(ctx)
    local h = 5381
    local s = ctx.uri
    for i = 1, #s do
        h = (h * 33 + byte(s, i)) % 4294967296
    end
    ctx.request_id = format("%08x-%04x-%04x", h, ctx.seq % 65536, #s)
    ctx.resp_headers["X-Request-Id"] = ctx.request_id
end

local function response_rewrite(ctx)
    local fields = {}
    for k, v in pairs(ctx.resp_headers) do
        fields[#fields + 1] = k .. "=" .. tostring(v)
    end
    table.sort(fields)
    ctx.header_digest = concat(fields, ";")
    local m = ngx.re.match(ctx.header_digest, [[X-Request-Id=([0-9a-f]+)]], "jo")
    ctx.rid_prefix = m and sub(m[1], 1, 4) or "none"
end

_M.chain = { key_auth, limit_count, proxy_rewrite, request_id, response_rewrite }

-- Runs the chain in a coroutine that yields after each plugin (as APISIX phases do with
-- cosockets), resumed until done.
function _M.run(ctx)
    local step = coroutine.wrap(function()
        for i = 1, #_M.chain do
            _M.chain[i](ctx)
            coroutine.yield(i)
        end
        return 0
    end)
    local n = 0
    while step() ~= 0 do
        n = n + 1
    end
    return n
end

return _M
